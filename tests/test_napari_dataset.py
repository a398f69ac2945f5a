"""The Dataset dock widget in napari (Qt on Xvfb), driven with real key presses: Next, segment, save,
leave with unsaved work, come back and find the saved labels and prompts restored."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.gui


def key(viewer, qtbot, k, modifier=None):
    from qtpy.QtCore import Qt

    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, k, modifier or Qt.NoModifier)


@pytest.fixture
def dataset_panel(make_napari_viewer, monkeypatch, tmp_path):
    """(viewer, medsam widget, dataset widget, folder, answers): a plain folder of three crops of the
    spleen sample; `answers` is the list the unsaved-work question pops its replies from."""
    from dataset_helpers import crop_case

    from medsam_plugin.napari.dataset_widget import DatasetWidget
    from medsam_plugin.napari.widget import MedSAMWidget

    monkeypatch.setenv("MEDSAM_PLUGIN_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "scans"
    for name, (z0, z1) in {"a": (8, 22), "b": (6, 20), "c": (10, 24)}.items():
        crop_case(folder / f"{name}.nii.gz", z0, z1, label_out=tmp_path / "truth" / f"{name}.nii.gz")
    viewer = make_napari_viewer()
    medsam = MedSAMWidget(viewer, autosave_policy="ignore", inline=True, embedding_cache=False)
    viewer.window.add_dock_widget(medsam)
    asked: list[str] = []
    answers: list[str] = []

    def ask(name):
        asked.append(name)
        return answers.pop(0)

    panel = DatasetWidget(viewer, medsam_widget=medsam, ask_unsaved=ask, inline=True)
    viewer.window.add_dock_widget(panel)
    panel.asked = asked
    return viewer, medsam, panel, folder, answers


def _use_truth(medsam, truth_path):
    """Let the open case's session answer prompts with its ground truth (tests/fakes.py)."""
    from dataset_helpers import truth_view
    from fakes import FakePredictor

    from medsam_plugin.engine.propagation import StopRules

    truth = truth_view(medsam.session, truth_path)
    medsam.session._predictor = FakePredictor(truth)
    medsam.session.stop_rules = StopRules(min_iou_with_previous=None)
    return truth


def test_dataset_panel_next_save_leave_and_restore_with_keys(dataset_panel, qtbot, tmp_path):
    from qtpy.QtCore import Qt

    from medsam_plugin.engine.propagation import bounding_box_xyxy
    from medsam_plugin.io import read_labels

    viewer, medsam, panel, folder, answers = dataset_panel
    assert panel.open_folder(folder)
    assert panel.case_list.count() == 3 and panel.progress_label.text() == "0 of 3 done"

    key(viewer, qtbot, Qt.Key_N, Qt.ShiftModifier)  # Next: the first case to do
    assert panel.current == "a" and medsam.session is not None
    assert panel.dataset.case("a").status == "in_progress"
    from napari.layers import Image

    assert [l for l in viewer.layers if isinstance(l, Image)] == [panel.image_layer]
    truth = _use_truth(medsam, tmp_path / "truth" / "a.nii.gz")
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    medsam.set_slice(z)
    medsam.add_box(bounding_box_xyxy(truth[z]), z=z)
    viewer.layers.selection.active = medsam.fg_layer
    key(viewer, qtbot, Qt.Key_S)  # segment the slice
    key(viewer, qtbot, Qt.Key_P)  # propagate
    qtbot.waitUntil(lambda: (medsam.session.labels.array == 1).sum() > truth.sum() * 0.9, timeout=20000)
    expected = medsam.session.labels_ijk().copy()

    key(viewer, qtbot, Qt.Key_S, Qt.ShiftModifier)  # save the case
    case = panel.dataset.case("a")
    assert case.status == "done" and case.label.is_file() and case.prompts_path.is_file()
    assert np.array_equal(read_labels(case.label, medsam.session.volume), expected)
    assert panel.progress_label.text().startswith("1 of 3 done")
    assert "done" in panel.case_list.item(0).text() and " mL" in panel.case_list.item(0).text()
    raw = json.loads((folder / "dataset.json").read_text())
    assert raw["labels"]["1"] == medsam.session.labels.objects[1].name

    # unsaved work: a brush stroke, then Next asks; "cancel" stays, "discard" leaves
    arr = medsam.labels_layer.data.copy()
    arr[z, 1:4, 1:4] = 1
    medsam.labels_layer.data = arr
    medsam.session.paint(medsam.session.view.to_view(medsam.session.view.from_view(arr)))
    answers += ["cancel"]
    key(viewer, qtbot, Qt.Key_N, Qt.ShiftModifier)
    assert panel.asked == ["a"] and panel.current == "a"
    answers += ["discard"]
    key(viewer, qtbot, Qt.Key_N, Qt.ShiftModifier)
    assert panel.asked == ["a", "a"] and panel.current == "b"
    assert medsam.session.labels.array.max() == 0  # a new case starts empty...
    assert [o.name for o in medsam.session.labels.objects.values()] == [raw["labels"]["1"]]  # ...with the dataset's objects

    key(viewer, qtbot, Qt.Key_K, Qt.ShiftModifier)  # skip b: on to c
    assert panel.dataset.case("b").status == "skipped" and panel.current == "c"

    key(viewer, qtbot, Qt.Key_B, Qt.ShiftModifier)  # previous: b
    key(viewer, qtbot, Qt.Key_B, Qt.ShiftModifier)  # previous: a, restored as saved (not the discarded stroke)
    assert panel.current == "a" and not panel.asked[2:]
    assert len([l for l in viewer.layers if isinstance(l, Image)]) == 1  # each case's scan replaced the last
    assert np.array_equal(medsam.session.labels_ijk(), expected)
    boxes = medsam.box_layer.data
    assert len(boxes) == 1 and int(round(boxes[0][0, 0])) == z  # the prompts came back too
    assert medsam.session.was_propagated(1)
    assert panel.progress_label.text() == "1 of 3 done (1 in progress, 1 skipped)"


def test_train_button_refuses_with_too_few_done_cases(dataset_panel, monkeypatch):
    viewer, medsam, panel, folder, answers = dataset_panel
    panel.open_folder(folder)
    said = []
    monkeypatch.setattr("medsam_plugin.napari.dataset_widget._notify", lambda kind, msg: said.append((kind, msg)))
    assert panel.train() is None
    assert said and "at least 2 done cases" in said[0][1]
