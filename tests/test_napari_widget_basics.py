"""Widget behaviour that needs no model: objects, shortcuts, painting sync, autosave, errors (Qt on Xvfb)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.gui

@pytest.fixture
def make_widget(spleen_widget):
    """(viewer, make): conftest's `spleen_widget` without a fake predictor (nothing here segments)."""
    viewer, build = spleen_widget
    return viewer, lambda policy="ignore": build(policy=policy, predictor=None)


def key(viewer, qtbot, k, modifier=None):
    from qtpy.QtCore import Qt

    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, k, modifier or Qt.NoModifier)


def paint(widget, qtbot, zyx, label_id, size=7):
    layer = widget.labels_layer
    layer.brush_size = size
    layer.paint(zyx, label_id)
    qtbot.waitUntil(lambda: (widget.session.labels.array == label_id).any(), timeout=5000)


def test_objects_add_rename_delete_select(make_widget, qtbot):
    from qtpy.QtCore import Qt

    viewer, make = make_widget
    w = make()
    viewer.layers.selection.active = w.fg_layer  # our keys win over the Points layer's own
    key(viewer, qtbot, Qt.Key_N)
    key(viewer, qtbot, Qt.Key_N)
    assert sorted(w.session.labels.objects) == [1, 2] and w.current_label == 2
    assert w.panel.object_list.count() == 2
    w.rename_object(1, "liver")
    assert w.panel.object_list.item(0).text().split("  —  ")[0] == "liver"
    assert w.labels_layer.metadata["medsam_label_names"][1] == "liver"
    w.select_object(1)
    assert w.labels_layer.selected_label == 1
    w.delete_object(2)
    assert list(w.session.labels.objects) == [1] and w.panel.object_list.count() == 1


def test_prompts_belong_to_their_object(make_widget):
    viewer, make = make_widget
    w = make()
    a = w.add_object("a")
    w.add_point((50, 60), positive=True, z=12)
    b = w.add_object("b")
    assert len(w.fg_layer.data) == 0  # b starts with no prompts
    w.add_box((10, 10, 30, 30), z=3)
    w.select_object(a)
    assert len(w.fg_layer.data) == 1 and len(w.box_layer.data) == 0
    pts, labels, box = w.prompt_layers.on_slice(12)[:3]
    assert box is None and labels.tolist() == [1] and np.allclose(pts, [[50, 60]])
    w.select_object(b)
    assert w.prompt_layers.on_slice(3)[2].tolist() == [10, 10, 30, 30]


def test_painting_syncs_undo_clear_and_stop(make_widget, qtbot):
    from qtpy.QtCore import Qt

    viewer, make = make_widget
    w = make()
    obj = w.add_object("painted")
    paint(w, qtbot, (12, 80, 80), obj)
    n = int((w.session.labels.array == obj).sum())
    assert n > 0
    key(viewer, qtbot, Qt.Key_C)  # clear object
    assert not (np.asarray(w.labels_layer.data) == obj).any()
    key(viewer, qtbot, Qt.Key_Z, Qt.ControlModifier)  # undo the clear
    assert int((np.asarray(w.labels_layer.data) == obj).sum()) == n
    # Stop here on the painted slice removes it there; a later propagation would not enter it.
    w.set_slice(12)
    key(viewer, qtbot, Qt.Key_X)
    assert w.session.stop_slices[obj] == {12} and not (w.session.labels.array[12] == obj).any()
    key(viewer, qtbot, Qt.Key_C)  # clearing the object also forgets where it stops
    assert not w.session.stop_slices.get(obj)


def test_segment_without_prompt_explains_what_to_do(make_widget, qtbot, monkeypatch):
    import medsam_plugin.napari.widget.controller as mod

    seen = []
    monkeypatch.setattr(mod, "_notify", lambda kind, msg: seen.append((kind, msg)))
    viewer, make = make_widget
    w = make()
    w.add_object()
    assert w.segment_slice() is None
    assert seen and seen[-1][0] == "warning" and "draw a box" in seen[-1][1]
    w.propagate()
    assert "no segmented slice" in seen[-1][1]


def test_autosave_is_offered_back(make_widget, qtbot, tmp_path):
    viewer, make = make_widget
    w = make()
    obj = w.add_object("kept")
    paint(w, qtbot, (10, 70, 90), obj)
    w.set_slice(14)
    w.stop_here()
    saved = w.session.labels.array.copy()
    assert w.autosave_folder is not None and (w.autosave_folder / "state.json").is_file()
    assert json.loads((w.autosave_folder / "state.json").read_text())["stop_slices"] == {str(obj): [14]}
    w.close()
    # The same scan opened again: "ask" enables the restore button; "restore" brings it back.
    w_ask = make("ask")
    assert w_ask.panel.restore_btn.isEnabled()
    assert not w_ask.session.labels.array.any()
    assert w_ask.restore_autosave()
    np.testing.assert_array_equal(w_ask.session.labels.array, saved)
    np.testing.assert_array_equal(w_ask.labels_layer.data, saved)
    assert w_ask.session.labels.objects[obj].name == "kept"
    assert w_ask.session.stop_slices[obj] == {14}
    w_ask.close()
    w_restore = make("restore")
    np.testing.assert_array_equal(w_restore.session.labels.array, saved)
    assert w_restore.session.stop_slices[obj] == {14}


def test_changing_model_or_device_keeps_the_work(make_widget, qtbot):
    from medsam_plugin.engine.predictor import SlicePrediction

    viewer, make = make_widget
    w = make()
    obj = w.add_object("kept")
    paint(w, qtbot, (8, 60, 60), obj)
    paint(w, qtbot, (12, 60, 60), obj)
    qtbot.waitUntil(lambda: (w.session.labels.array[12] == obj).any(), timeout=5000)
    seed = w.session.labels.array[12] == obj  # a seed on slice 12, as an accepted segmentation makes
    w.session.accept(obj, SlicePrediction(z=12, mask_yx=seed, logits_256=np.zeros((256, 256), np.float32), iou=1.0))
    w.set_slice(12)
    w.stop_here()  # erases slice 12 and its seed (undoable), marks it
    before = w.session.labels.array.copy()
    assert not (before[12] == obj).any() and 12 not in w.session.seeds[obj]
    w.panel.device_combo.setCurrentText("cpu")
    assert w.session.device == "cpu" and not w.session.model_loaded
    w.panel.model_combo.setEditText("lite_medsam")  # an installed model: a choice is checked when made
    w.change_model()
    assert w.session.model_name == "lite_medsam" and not w.session.model_loaded
    np.testing.assert_array_equal(w.session.labels.array, before)
    np.testing.assert_array_equal(w.labels_layer.data, before)
    assert w.session.labels.objects[obj].name == "kept" and w.session.stop_slices[obj] == {12}
    # The undo history carries over, and undo restores the seeds of the session in use.
    w.undo()
    assert (w.session.labels.array[12] == obj).sum() == seed.sum() and 12 in w.session.seeds[obj]
    np.testing.assert_array_equal(w.labels_layer.data, w.session.labels.array)


def test_the_manifest_names_the_widget_package_and_the_old_path_still_imports():
    import importlib

    import yaml

    from conftest import REPO_ROOT
    from medsam_plugin.napari._widget import MedSAMWidget as Old
    from medsam_plugin.napari.widget import MedSAMWidget

    manifest = yaml.safe_load((REPO_ROOT / "napari.yaml").read_text())
    [command] = [c for c in manifest["contributions"]["commands"] if c["id"] == "medsam-plugin.widget"]
    module, name = command["python_name"].split(":")
    assert getattr(importlib.import_module(module), name) is MedSAMWidget is Old
    assert module == "medsam_plugin.napari.widget"
