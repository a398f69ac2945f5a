"""Issue 11, item 7: radiology aids in the panel and the viewer (Qt on Xvfb, fake predictor)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from test_napari_widget_trust import key, make, seed  # noqa: E402,F401  (fixture and helpers)

pytestmark = pytest.mark.gui


def test_orientation_markers_and_a_slider_that_counts_slices(make, qtbot):
    viewer, build = make
    w = build()
    markers = viewer.layers["MedSAM orientation"]
    letters = list(markers.features["letter"])
    assert letters == ["A", "P", "R", "L"]  # top, bottom, left, right of an axial slice (radiological)
    left, right = markers.data[2], markers.data[3]
    assert left[1] < w.session.shape_zyx[2] / 2 < right[1]  # patient right on the screen's left
    assert markers.data[0][0] < markers.data[1][0]  # anterior at the top
    assert viewer.dims.axis_labels[0] == "slice"
    viewer.dims.set_current_step(0, 7)  # the slider's number is the slice the panel works on
    assert w.current_z() == 7 == viewer.dims.current_step[0]


def test_volume_hide_lock_and_colour_per_object(make, qtbot, monkeypatch):
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QPushButton

    import medsam_plugin.napari.widget.controller as mod

    seen = []
    monkeypatch.setattr(mod, "_notify", lambda kind, msg: seen.append((kind, msg)))
    viewer, build = make
    w = build()
    obj = w.add_object("blob")
    layer = w.labels_layer
    layer.brush_size = 7
    layer.paint((10, 80, 80), obj)
    qtbot.waitUntil(lambda: (w.session.labels.array == obj).any(), timeout=5000)
    n = int((w.session.labels.array == obj).sum())
    item = w.panel.object_list.item(0)
    assert item.text().endswith(f"{n * w.voxel_ml():.1f} mL")
    # hide: untick the object
    item.setCheckState(Qt.Unchecked)
    assert layer.colormap.color_dict[obj][3] == 0 and obj in w.hidden
    w.panel.object_list.item(0).setCheckState(Qt.Checked)
    assert layer.colormap.color_dict[obj][3] == 1
    # lock: the Lock button; then painting over it is put back and S is refused
    lock = [b for b in w.findChildren(QPushButton) if b.text() == "Lock"][0]
    qtbot.mouseClick(lock, Qt.LeftButton)
    assert obj in w.session.locked and "locked" in w.panel.object_list.item(0).text()
    other = w.add_object("other")
    layer.selected_label = other
    layer.paint((10, 80, 80), other)
    qtbot.waitUntil(lambda: any("locked" in m for _, m in seen), timeout=5000)
    assert int((w.session.labels.array == obj).sum()) == n and not (w.session.labels.array == other).any()
    np.testing.assert_array_equal(np.asarray(layer.data), w.session.labels.array)
    # colour
    w.set_object_color(obj, (10, 200, 30))
    np.testing.assert_allclose(layer.colormap.color_dict[obj][:3], np.array([10, 200, 30]) / 255.0, atol=1e-6)
    assert layer.metadata["medsam_label_colors"][obj] == (10, 200, 30)


def test_the_panel_shows_a_progress_bar_with_slice_count_and_time_left(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build(inline=False, radius_z=14, gate_z=20)
    seed(w, viewer, qtbot)
    assert w.panel.progress.isHidden()
    key(viewer, qtbot, Qt.Key_U)
    qtbot.waitUntil(w.session._predictor.reached.is_set, timeout=20_000)
    qtbot.waitUntil(lambda: w.panel.progress.value() > 0, timeout=10_000)
    assert not w.panel.progress.isHidden() and w.panel.progress.maximum() > w.panel.progress.value()
    text = w.panel.progress_label.text()
    assert " of ~" in text and "s left" in text and "slice" in text
    w.session._predictor.gate.set()
    assert w.wait(20)
    assert w.panel.progress.isHidden()
