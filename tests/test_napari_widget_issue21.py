"""Issue 21: what a new user trips over in the panel (Qt on Xvfb, fake predictor; real keys, drags, deletions).

Set MEDSAM_TEST_SCREENS=<folder> to keep a screenshot of each state checked here (a human look only:
under Xvfb a screenshot can trip vispy's framebuffer stack, which pytest-qt then reports).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from conftest import canvas_point, drag_on_canvas  # noqa: E402
from test_napari_widget_trust import box_of, key, make, seed  # noqa: E402,F401  (fixture and helpers)

pytestmark = pytest.mark.gui

MEDSAM_PREFIX = "MedSAM "


def shot(viewer, name: str) -> None:
    folder = os.environ.get("MEDSAM_TEST_SCREENS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(Path(folder) / f"{name}.png"), canvas_only=False)


def medsam_layers(viewer) -> list[str]:
    return [layer.name for layer in viewer.layers if layer.name.startswith(MEDSAM_PREFIX)]


def camera_state(viewer):
    return tuple(np.round(viewer.scene.camera.center, 3)), round(float(viewer.scene.camera.zoom), 4)


def assert_panel_closed(w, viewer):
    """Nothing of the closed scan is left: layers, objects, strip, actions, and the view is fitted."""
    p = w.panel
    assert medsam_layers(viewer) == []
    assert w.session is None and w.image_layer is None and w.label_layers is None and w.prompt_layers is None
    assert p.object_list.count() == 0
    assert p.confidence_strip.n_slices == 0 and p.review_label.text() == "Propagate an object to see how sure each slice is."
    assert not any(b.isEnabled() for b in p.buttons.values())
    assert not p.precompute_btn.isEnabled() and not p.export_btn.isEnabled() and not p.cancel_btn.isEnabled()
    assert p.progress.isHidden()
    assert "closed" in p.status.text()
    fitted = camera_state(viewer)
    viewer.reset_view()
    assert camera_state(viewer) == fitted  # the widget fitted the view already


# ---------------------------------------------------------------- 3: removing the image layer
def test_removing_the_scan_during_propagation_clears_the_panel_and_the_layers(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build(inline=False, radius_z=14, gate_z=17)
    seed(w, viewer, qtbot)
    key(viewer, qtbot, Qt.Key_P)
    qtbot.waitUntil(w.session._predictor.reached.is_set, timeout=20_000)
    fake = w.session._predictor
    viewer.scene.camera.zoom *= 3  # the user zoomed in on the object
    viewer.scene.camera.center = (0, *(np.asarray(viewer.scene.camera.center[1:]) + 40))
    shot(viewer, "issue21_3_before_removal_during_P")
    viewer.layers.remove(w.image_layer)
    fake.gate.set()
    assert w.wait(20)
    qtbot.wait(100)  # late reports and the end of the worker: none may bring anything back
    assert_panel_closed(w, viewer)
    shot(viewer, "issue21_3_after_removal_during_P")
    # the keys say what to do instead of acting on a closed scan
    key(viewer, qtbot, Qt.Key_S)
    assert w.session is None and medsam_layers(viewer) == []


def test_deleting_the_scan_in_the_layer_list_after_propagation(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build()
    seed(w, viewer, qtbot)
    key(viewer, qtbot, Qt.Key_P)
    assert w.panel.object_list.count() == 1 and w.panel.confidence_strip.n_slices > 0
    viewer.scene.camera.zoom *= 2
    viewer.scene.camera.center = (0, *(np.asarray(viewer.scene.camera.center[1:]) - 30))
    viewer.layers.selection = {w.image_layer}
    qtbot.mouseClick(viewer.window._qt_viewer.layerButtons.deleteButton, Qt.LeftButton)  # the list's bin
    qtbot.wait(50)
    assert "image" not in [layer.name for layer in viewer.layers]
    assert_panel_closed(w, viewer)
    # opening the scan again starts afresh, with the actions back
    from conftest import SAMPLE_DIR, SPLEEN_CASE

    viewer.open(SAMPLE_DIR / SPLEEN_CASE / "image.nii.gz", plugin="medsam-plugin")
    qtbot.waitUntil(lambda: w.session is not None, timeout=5000)
    assert w.panel.buttons["segment"].isEnabled() and w.panel.export_btn.isEnabled()
    assert "MedSAM labels" in medsam_layers(viewer)


def test_deleting_a_medsam_layer_by_hand_puts_it_back_with_its_work(make, qtbot):
    """The widget writes results, paint and prompts into its own layer objects: one deleted in the
    layer list must come back (same layer, same voxels), or later S/P would act on a hidden layer."""
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build()
    seed(w, viewer, qtbot)
    key(viewer, qtbot, Qt.Key_P)
    labels, box = w.labels_layer, w.box_layer
    voxels = int((labels.data != 0).sum())
    assert voxels > 0
    for layer in (labels, box):
        index = viewer.layers.index(layer)
        viewer.layers.selection = {layer}
        qtbot.mouseClick(viewer.window._qt_viewer.layerButtons.deleteButton, Qt.LeftButton)
        qtbot.wait(50)
        assert layer in viewer.layers and viewer.layers.index(layer) == index
        assert "put back" in w.panel.status.text()
    assert w.labels_layer is labels and int((labels.data != 0).sum()) == voxels
    # the session goes on in the restored layers: a new box and S show a new preview
    w.set_slice(14)
    w.add_box(box_of(w.truth[14]))
    key(viewer, qtbot, Qt.Key_S)
    assert w.wait(20)
    assert w.pending is not None and w.pending_layer in viewer.layers and w.pending_layer.data[14].any()
    assert box in viewer.layers and len(box.data) >= 1
    # removing the scan still closes everything (the put-back rule does not fight the close)
    viewer.layers.remove(w.image_layer)
    qtbot.wait(50)
    assert_panel_closed(w, viewer)


# ---------------------------------------------------------------- 4: a model choice is checked when made
def choose_model(w, qtbot, text):
    """Type a model name or path in the panel's model box and press Enter, as a user does."""
    from qtpy.QtCore import Qt

    edit = w.panel.model_combo.lineEdit()
    edit.selectAll()
    qtbot.keyClicks(edit, text)
    qtbot.keyClick(edit, Qt.Key_Return)


def test_a_model_choice_without_usable_weights_is_refused_at_once(make, qtbot, monkeypatch, tmp_path):
    import medsam_plugin.napari.widget.controller as mod
    from medsam_plugin.model import registry

    seen = []
    monkeypatch.setattr(mod, "_notify", lambda kind, msg: seen.append((kind, msg)))
    viewer, build = make
    w = build()
    before = (w.session.model_name, w.session.device)
    # a registered model whose weights are not bundled
    choose_model(w, qtbot, "sam_vit_b")
    assert "cannot be used" in w.panel.status.text() and "not bundled" in w.panel.status.text()
    assert seen and seen[-1][0] == "warning"
    assert w.panel.model_name() == before[0] and (w.session.model_name, w.session.device) == before
    shot(viewer, "issue21_4_model_not_installed")
    # a checkpoint path that does not exist, and one that is damaged
    choose_model(w, qtbot, str(tmp_path / "missing.pth"))
    assert "does not exist" in w.panel.status.text() and w.panel.model_name() == before[0]
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint" * 1000)
    choose_model(w, qtbot, str(junk))
    assert "damaged" in w.panel.status.text() and w.session.model_name == before[0]
    # the package that ships LiteMedSAM's weights is missing: both shipped models need it
    monkeypatch.setattr(registry, "LITE_MEDSAM_PACKAGE", ("no-such-dist-xyz", "no_such_pkg_xyz", "asset/w.pth"))
    choose_model(w, qtbot, "lite_medsam")
    assert "not installed" in w.panel.status.text() and w.session.model_name == before[0]
    # a device that is not here
    if not __import__("torch").cuda.is_available():
        w.panel.device_combo.setCurrentText("cuda")
        assert "cannot be used" in w.panel.status.text() and w.panel.device_name() == before[1]
    monkeypatch.undo()
    monkeypatch.setattr(mod, "_notify", lambda kind, msg: seen.append((kind, msg)))
    # a working choice is taken
    try:
        registry.find_lite_medsam_weights()
    except registry.ModelLoadError:
        return
    n = len(seen)
    choose_model(w, qtbot, "lite_medsam")
    assert w.session.model_name == "lite_medsam" and "lite_medsam" in w.panel.status.text() and len(seen) == n


# ---------------------------------------------------------------- 6: defaults and cosmetics
def test_redo_brings_an_undone_preview_back(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build()
    w.set_slice(12)
    w.add_box(box_of(w.truth[12]))
    key(viewer, qtbot, Qt.Key_S)
    shown = np.asarray(w.pending_layer.data[12]).copy()
    assert shown.any()
    key(viewer, qtbot, Qt.Key_Z, Qt.ControlModifier)
    assert w.pending is None and not np.asarray(w.pending_layer.data).any()
    assert w.panel.buttons["redo"].isEnabled()
    key(viewer, qtbot, Qt.Key_Z, Qt.ControlModifier | Qt.ShiftModifier)
    assert w.pending is not None and "Redid" in w.panel.status.text()
    np.testing.assert_array_equal(np.asarray(w.pending_layer.data[12]), shown)
    key(viewer, qtbot, Qt.Key_A)
    assert (w.session.labels.array[12] > 0).sum() == int(shown.astype(bool).sum())


def test_the_object_list_measures_the_preview_on_screen(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build()
    w.set_slice(12)
    w.add_box(box_of(w.truth[12]))
    key(viewer, qtbot, Qt.Key_S)
    px = int(np.count_nonzero(w.pending[1].mask_yx))
    text = w.panel.object_list.item(0).text()
    assert f"preview {px * w.voxel_ml():.1f} mL" in text and text.split("  —  ")[1].startswith("0.0 mL")
    shot(viewer, "issue21_6_preview_volume")
    key(viewer, qtbot, Qt.Key_A)
    text = w.panel.object_list.item(0).text()
    assert "preview" not in text and f"{px * w.voxel_ml():.1f} mL" in text


def test_a_click_with_the_box_tool_says_to_drag(make, qtbot, monkeypatch):
    from qtpy.QtCore import Qt

    import medsam_plugin.napari.widget.controller as mod

    seen = []
    monkeypatch.setattr(mod, "_notify", lambda kind, msg: seen.append((kind, msg)))
    viewer, build = make
    w = build()
    w.set_slice(12)
    w.activate_box_tool()
    ny, nx = w.session.shape_zyx[1:]
    drag_on_canvas(viewer, w.box_layer, [(12, ny // 2, nx // 2)])  # press and release on one spot
    key(viewer, qtbot, Qt.Key_S)
    assert "needs a drag" in w.panel.status.text() and "outside" not in w.panel.status.text()
    assert seen and "drag" in seen[-1][1] and "outside" not in seen[-1][1]
    assert w.pending is None and not w.session.labels.objects  # nothing made, no empty object
    # a real drag then works
    drag_on_canvas(viewer, w.box_layer, [(12, ny // 2 - 30, nx // 2 - 30), (12, ny // 2, nx // 2),
                                         (12, ny // 2 + 30, nx // 2 + 30)])
    key(viewer, qtbot, Qt.Key_S)
    assert w.pending is not None


def test_propagation_to_one_slice_is_worded_right(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build(radius_z=0.5)  # the object lies on slice 12 alone
    seed(w, viewer, qtbot)
    key(viewer, qtbot, Qt.Key_P)
    text = w.panel.status.text()
    assert "Propagated to slice 12 only" in text and "(1 slices)" not in text


def test_markers_under_the_masks_hollow_points_and_no_letters_in_3d(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build()
    layers = viewer.layers
    markers = layers["MedSAM orientation"]
    assert layers.index(markers) < layers.index(w.labels_layer) < layers.index(w.pending_layer)
    # a + click inside a small structure: a small ring, so the structure stays visible inside the marker
    w.set_slice(12)
    w.activate_point_tool(True)
    ny, nx = w.session.shape_zyx[1:]
    drag_on_canvas(viewer, w.fg_layer, [(12, ny // 2, nx // 2)])
    assert len(w.fg_layer.data) == 1
    assert np.all(w.fg_layer.face_color[:, 3] == 0) and np.allclose(w.fg_layer.border_color[0, :3], (0, 1, 0))
    assert float(w.fg_layer.size[0]) <= 5
    viewer.dims.ndisplay = 3
    assert not markers.visible
    viewer.dims.ndisplay = 2
    assert markers.visible
    key(viewer, qtbot, Qt.Key_S)  # the keys still work after the 3D round trip
    assert w.pending is not None


def _lung_ct(tmp_path):
    """A lung CT from real data: the TotalSegmentator CT's slices that hold the lungs (its lung bases)."""
    import nibabel as nib

    from conftest import require_shared_data

    case = require_shared_data() / "ct_abdomen_totalseg_sm"
    image, label = nib.load(case / "image.nii.gz"), nib.load(case / "label.nii.gz")
    lungs = np.isin(np.asarray(label.dataobj), [10, 11, 12, 13, 14]).sum(axis=(0, 1))  # per k slice
    ks = np.nonzero(lungs >= 400)[0]
    assert len(ks) >= 3
    out = tmp_path / "lung_ct.nii.gz"
    nib.save(image.slicer[:, :, int(ks.min()): int(ks.max()) + 1], out)
    return out


def test_a_lung_ct_opens_in_the_lung_window_and_an_mr_shows_its_scaling(make_napari_viewer, qtbot, tmp_path,
                                                                      monkeypatch):
    from medsam_plugin.engine.preprocessing import WINDOW_PRESETS
    from medsam_plugin.napari.widget import MedSAMWidget

    monkeypatch.setenv("MEDSAM_PLUGIN_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    viewer.open(_lung_ct(tmp_path), plugin="medsam-plugin")
    w = MedSAMWidget(viewer, autosave_policy="ignore", inline=True, embedding_cache=False)
    viewer.window.add_dock_widget(w)
    level, width = WINDOW_PRESETS["lung"]
    assert w.panel.window_combo.currentText() == "lung" and w.session.window == (level, width)
    assert tuple(w.image_layer.contrast_limits) == (level - width / 2, level + width / 2)
    assert "Window: lung" in w.panel.status.text()
    # the level and width show whole at the dock's width
    # level and width on a row of their own (not squeezed beside the preset box), in HU
    assert not w.panel.ct_fields.isHidden() and w.panel.mr_note.isHidden()
    assert w.panel.level_spin.parentWidget() is w.panel.ct_fields and w.panel.level_spin.suffix() == " HU"
    shot(viewer, "issue21_6_lung_ct_window")
    # an MR: no CT values, its own scaling said instead
    from conftest import require_shared_data

    mr = require_shared_data() / "mr_brain_edema_brats2021_01646" / "image.nii.gz"
    [layer] = viewer.open(mr, plugin="medsam-plugin")
    assert w.start_session(layer)
    assert w.session.modality == "MR" and w.session.window == "mr"
    assert w.panel.ct_fields.isHidden() and not w.panel.window_combo.isEnabled()
    assert not w.panel.mr_note.isHidden() and "percentiles" in w.panel.mr_note.text()
    shot(viewer, "issue21_6_mr_window")


# ---------------------------------------------------------------- 2: a slow one-time step says so
def test_a_slow_one_time_step_shows_its_message_and_estimate(make, qtbot):
    """The engine's `SegmentationSession.prepare` yields Progress(kind="prepare", message, estimate_s)
    before converting the fast encoder (branch fix21-engine); the panel shows it while it runs."""
    import threading
    from types import SimpleNamespace

    from qtpy.QtCore import Qt

    viewer, build = make
    w = build(inline=False)
    gate, reached = threading.Event(), threading.Event()
    message = "Preparing the fast encoder (one time, about 60 s)..."

    def prepare():
        yield SimpleNamespace(done=1, total=2, message=message, kind="prepare", estimate_s=60.0, z=None,
                              prediction=None)
        reached.set()
        gate.wait(20)
        return w.session._predictor

    w.session.prepare = prepare
    w.set_slice(12)
    w.add_box(box_of(w.truth[12]))
    key(viewer, qtbot, Qt.Key_S)
    qtbot.waitUntil(reached.is_set, timeout=20_000)
    qtbot.waitUntil(lambda: message in w.panel.status.text(), timeout=5000)
    assert "s left" in w.panel.progress_label.text() and not w.panel.progress.isHidden()
    shot(viewer, "issue21_2_preparing_fast_encoder")
    gate.set()
    assert w.wait(20)
    assert "Slice 12 segmented" in w.panel.status.text() and w.pending is not None


# ---------------------------------------------------------------- 5: a weak answer is flagged
def test_an_unsure_one_click_answer_is_flagged_with_what_to_do(make, qtbot):
    from dataclasses import replace

    from qtpy.QtCore import Qt

    from medsam_plugin.engine.advice import WEAK_ANSWER_IOU

    viewer, build = make
    w = build()
    fake = w.session._predictor
    answer = fake.predict

    def unsure(z, **kwargs):
        return replace(answer(z, **kwargs), iou=0.35)

    fake.predict = unsure
    ny, nx = w.session.shape_zyx[1:]
    w.set_slice(12)
    w.activate_point_tool(True)
    drag_on_canvas(viewer, w.fg_layer, [(12, ny // 2, nx // 2)])  # one click
    key(viewer, qtbot, Qt.Key_S)
    text = w.panel.status.text()
    assert "predicted IoU 0.35" in text and "unsure" in text and "draw a box" in text
    shot(viewer, "issue21_5_unsure_answer")
    # a sure answer is not flagged
    fake.predict = lambda z, **kwargs: replace(answer(z, **kwargs), iou=min(0.99, WEAK_ANSWER_IOU + 0.1))
    w.add_box(box_of(w.truth[12]))
    key(viewer, qtbot, Qt.Key_S)
    assert "unsure" not in w.panel.status.text() and "A accepts" in w.panel.status.text()


# ---------------------------------------------------------------- an unevenly spaced DICOM series
def test_an_unevenly_spaced_series_says_its_volumes_are_approximate_and_refuses_a_label_map(
        make_napari_viewer, qtbot, tmp_path, write_dicom_series, monkeypatch):
    """Slices at 0, 5, 15 and 20 mm: the panel says so on opening, marks every mL as approximate,
    and its export refuses a NIfTI label map (one slice spacing would carry the error)."""
    from test_bad_inputs import _series_with_positions

    from medsam_plugin.napari.widget import MedSAMWidget

    monkeypatch.setenv("MEDSAM_PLUGIN_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    viewer.open(_series_with_positions(write_dicom_series, tmp_path / "gap", drop=(2,)), plugin="medsam-plugin")
    w = MedSAMWidget(viewer, autosave_policy="ignore", inline=True, embedding_cache=False)
    viewer.window.add_dock_widget(w)
    assert w.session is not None
    assert "unevenly spaced" in w.panel.status.text() and "approximate" in w.panel.status.text()
    label_id = w.add_object("lesion")
    w.session.labels.array[1, 4:10, 4:10] = label_id
    w._refresh_objects()
    assert "≈" in w.panel.object_list.item(0).text()
    assert w.export(tmp_path / "gap.nii.gz") is None
    assert not list(tmp_path.glob("gap.nii*"))


def test_the_panel_keeps_its_rows_on_a_short_screen_and_fits_its_dock(make, qtbot):
    """At 1100 x 650 the panel used to be squeezed into the dock: the buttons' captions were cut in
    half. It scrolls instead, and a long scan name does not push it past the dock's right edge."""
    from qtpy.QtCore import QPoint
    from qtpy.QtWidgets import QPushButton

    viewer, build = make
    w = build()
    viewer.add_image(np.zeros((2, 8, 8), np.float32), name="scan_" + "with_a_very_long_series_description_" * 4)
    assert w.panel.scan_combo.count() == 2  # the long name is one of the scans offered
    window = viewer.window._qt_window
    window.resize(1100, 650)
    window.show()  # the fixture's viewer is hidden, and a hidden window lays nothing out
    qtbot.waitExposed(window)
    qtbot.wait(100)
    buttons = [b for b in w.panel.findChildren(QPushButton) if b.isVisible()]
    assert buttons
    squeezed = [b.text() for b in buttons if b.height() < b.sizeHint().height()]
    assert squeezed == []
    assert w.scroll.verticalScrollBar().maximum() > 0  # the rest is a scroll away
    assert w.panel.width() <= w.scroll.viewport().width()
    # The status line is not a scroll away: it sits under the scrolling panel, inside the window.
    w.panel.set_status("The model is unsure of this answer: draw a box around the structure or add a click. " * 2)
    qtbot.wait(50)
    bottom = w.panel.status.mapTo(window, QPoint(0, w.panel.status.height())).y()
    assert 0 < bottom <= window.height(), f"the status line ends {bottom} px down a {window.height()} px window"
    assert not w.panel.isAncestorOf(w.panel.status) and w.panel.status.isVisible()
