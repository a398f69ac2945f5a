"""Brush edits in the autosave, and history buttons that say when there is nothing to undo (Qt on Xvfb).

Painting and boxes go through real mouse events on the viewer's canvas (`conftest.drag_on_canvas`),
keys through the canvas, buttons are clicked; the session answers through a fake predictor.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from conftest import drag_on_canvas  # noqa: E402
from test_napari_widget_trust import key, make, seed  # noqa: E402,F401  (fixture and helpers)

pytestmark = pytest.mark.gui


def button(w, text):
    """The panel's push button labelled `text` (as a user finds it)."""
    from qtpy.QtWidgets import QPushButton

    return next(b for b in w.findChildren(QPushButton) if b.text() == text)


def test_brush_edits_are_autosaved_and_come_back_on_restore(make, qtbot):
    """Issue 11: strokes painted with napari's brush reach the autosave by themselves, and a restore
    brings them back as brush edits: the next propagation keeps them (voxels added stay, erased
    voxels stay erased)."""
    from qtpy.QtCore import Qt

    from medsam_plugin.napari import _autosave

    viewer, build = make
    w = build(policy="ask")
    seed(w, viewer, qtbot)
    key(viewer, qtbot, Qt.Key_P)
    obj = w.current_label
    ny, nx = w.session.shape_zyx[1:]
    layer = w.labels_layer
    viewer.layers.selection.active = layer
    layer.brush_size = 7
    layer.selected_label = obj
    layer.mode = "paint"
    # A stroke outside the object on slice 14...
    w.set_slice(14)
    drag_on_canvas(viewer, layer, [(14, 8, 8), (14, 8, 24), (14, 16, 24)])
    added = (np.asarray(layer.data[14]) == obj) & ~w.truth[14]
    assert added.sum() > 30
    qtbot.waitUntil(lambda: (w.session.labels.array[14][added] == obj).all(), timeout=5000)
    # ...and an erased band through it on slice 10.
    w.set_slice(10)
    layer.mode = "erase"
    drag_on_canvas(viewer, layer, [(10, ny // 2, nx // 2 - 8), (10, ny // 2, nx // 2 + 8)])
    erased = w.truth[10] & (np.asarray(layer.data[10]) == 0)
    assert erased.sum() > 30
    qtbot.waitUntil(lambda: not (w.session.labels.array[10][erased] == obj).any(), timeout=5000)
    # The autosave holds both strokes, with no other action after them.
    saved_labels, _ = _autosave.load(w.autosave_folder)
    assert (saved_labels[14][added] == obj).all() and not (saved_labels[10][erased] == obj).any()
    saved = w.session.labels.array.copy()
    w.close()  # as after a crash: the next session finds the autosave

    w2 = build(policy="ask")
    qtbot.mouseClick(button(w2, "Restore autosave"), Qt.LeftButton)
    np.testing.assert_array_equal(w2.session.labels.array, saved)
    np.testing.assert_array_equal(np.asarray(w2.labels_layer.data), saved)
    # They are brush edits again, not just voxels: re-propagating the object keeps them.
    assert sorted(w2.session.edits.get(obj, {})) == [10, 14]
    w2.select_object(obj)
    key(viewer, qtbot, Qt.Key_P)
    assert (w2.session.labels.array[14][added] == obj).all()
    assert not (w2.session.labels.array[10][erased] == obj).any()
    np.testing.assert_array_equal(np.asarray(w2.labels_layer.data), w2.session.labels.array)


def test_undo_and_redo_are_greyed_out_when_there_is_nothing_to_take_back(make, qtbot):
    """Issue 13, item 6: Undo and Redo are enabled exactly when the session can undo / redo."""
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build(inline=False, radius_z=14, gate_z=20)
    undo, redo = button(w, "Undo [Ctrl+Z]"), button(w, "Redo")
    assert not undo.isEnabled() and not redo.isEnabled()  # a fresh scan: nothing done yet
    w.set_slice(12)
    ny, nx = w.session.shape_zyx[1:]
    # The box drawn with the rectangle tool, then S: a preview, which Undo can take back.
    drag_on_canvas(viewer, w.image_layer, [(12, ny // 4 - 3, nx // 4 - 3), (12, 3 * ny // 4 + 3, 3 * nx // 4 + 3)])
    assert len(w.box_layer.data) == 1
    key(viewer, qtbot, Qt.Key_S)
    assert w.wait(20)
    assert w.pending is not None and undo.isEnabled() and not redo.isEnabled()
    key(viewer, qtbot, Qt.Key_A)
    assert undo.isEnabled() and not redo.isEnabled()
    qtbot.mouseClick(undo, Qt.LeftButton)  # takes the accepted slice back: the history is empty again
    assert not w.session.labels.array.any()
    assert not undo.isEnabled() and redo.isEnabled()
    qtbot.mouseClick(redo, Qt.LeftButton)
    assert w.session.labels.array.any() and undo.isEnabled() and not redo.isEnabled()
    # While a propagation runs both are off; afterwards they follow the history again.
    key(viewer, qtbot, Qt.Key_U)
    qtbot.waitUntil(w.session._predictor.reached.is_set, timeout=20_000)
    assert not undo.isEnabled() and not redo.isEnabled()
    w.session._predictor.gate.set()
    assert w.wait(20)
    assert undo.isEnabled() and not redo.isEnabled()
    qtbot.mouseClick(undo, Qt.LeftButton)
    assert undo.isEnabled() and redo.isEnabled()


def test_a_background_click_the_model_ignores_is_carved_and_the_status_says_so(spleen_widget, qtbot):
    """A real click with the '-' points tool where the model keeps the region whatever it is told,
    then S: the region round the click that looks like it is cut out of the slice, the status
    says so, and Ctrl+Z brings it back."""
    from types import SimpleNamespace

    from qtpy.QtCore import Qt

    from fakes import FakePredictor

    class Stubborn(FakePredictor):
        spec = SimpleNamespace(reads_points=True, reads_masks=True, click_refine_passes=0)

    viewer, build = spleen_widget
    w = build(predictor=Stubborn)
    ny, nx = w.session.shape_zyx[1:]
    image = np.where(w.truth, 100, 0).astype(np.uint8)
    right = np.zeros_like(w.truth)
    right[:, :, nx // 2 + nx // 8:] = True
    image[w.truth & right] = 200  # the object's right part looks different
    w.session._predictor.volume = image
    seed(w, viewer, qtbot)
    key(viewer, qtbot, Qt.Key_P)
    assert w.wait(20)
    w.set_slice(13)  # a propagated slice: the click there corrects it
    before = w.session.labels.array[13].copy()
    click = (13, ny // 2, nx // 2 + nx // 4 - 2)
    assert before[click[1:]] and right[click]
    viewer.layers.selection.active = w.bg_layer
    w.bg_layer.mode = "add"
    drag_on_canvas(viewer, w.image_layer, [click])
    assert len(w.bg_layer.data) == 1
    key(viewer, qtbot, Qt.Key_S)
    assert w.wait(20)
    qtbot.waitUntil(lambda: "cut out" in w.panel.status.text(), timeout=20_000)
    assert w.wait(20)
    after = w.session.labels.array[13]
    assert not after[right[13]].any() and np.array_equal(after[~right[13]], before[~right[13]])
    key(viewer, qtbot, Qt.Key_Z, Qt.ControlModifier)
    assert w.wait(20)
    assert np.array_equal(w.session.labels.array[13], before)
