"""Issue 11: a cancel and edits that can be trusted, and the small defects (Qt on Xvfb, fake predictor).

Keys and buttons go through the viewer's canvas and the panel's real buttons; painting uses the
Labels layer's brush (`layer.paint`, what a mouse stroke calls).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from fakes import FakePredictor  # noqa: E402

pytestmark = pytest.mark.gui

class Fake(FakePredictor):
    loaded = None  # the widget remembers predictor.loaded after a run
    spec = None  # the widget then reads the chosen model's registry entry

    def __init__(self, truth, gate_z=None):
        super().__init__(truth)
        self.gate_z = gate_z  # predict on this slice waits for `gate` (and says it got there)
        self.reached = threading.Event()
        self.gate = threading.Event()

    def predict(self, z, **kwargs):
        if self.gate_z is not None and int(z) == self.gate_z:
            self.reached.set()
            self.gate.wait(20)
        return super().predict(z, **kwargs)


@pytest.fixture
def make(spleen_widget):
    """(viewer, build): conftest's `spleen_widget`, its session answering through `Fake`."""
    viewer, build = spleen_widget

    def build_fake(inline=True, radius_z=8, gate_z=None, policy="ignore"):
        return build(inline=inline, radius_z=radius_z, policy=policy, predictor=Fake, gate_z=gate_z)

    return viewer, build_fake


def key(viewer, qtbot, k, modifier=None):
    from qtpy.QtCore import Qt

    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, k, modifier or Qt.NoModifier)


def box_of(mask_yx, pad=2):
    rows, cols = np.nonzero(mask_yx)
    return [cols.min() - pad, rows.min() - pad, cols.max() + pad, rows.max() + pad]


def seed(w, viewer, qtbot, z=12):
    from qtpy.QtCore import Qt

    w.set_slice(z)
    w.add_box(box_of(w.truth[z]))
    key(viewer, qtbot, Qt.Key_S)
    assert w.wait(20)
    key(viewer, qtbot, Qt.Key_A)


# ---------------------------------------------------------------- 2: cancel
def test_cancel_after_the_last_slice_leaves_no_voxel_and_no_paint_step(make, qtbot):
    """The user presses Cancel while the model works on the walk's last slice (the moment the
    engine used to commit anyway): nothing of the run may stay, and A must not record a paint."""
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build(inline=False, radius_z=14, gate_z=None)
    nz = w.session.shape_zyx[0]
    w.session._predictor.gate_z = nz - 1  # walking up from 12 ends at the volume's last slice
    seed(w, viewer, qtbot)
    before = w.session.labels.array.copy()
    key(viewer, qtbot, Qt.Key_U)
    qtbot.waitUntil(w.session._predictor.reached.is_set, timeout=20_000)
    qtbot.mouseClick(w.panel.cancel_btn, Qt.LeftButton)
    w.session._predictor.gate.set()
    assert w.wait(20)
    qtbot.wait(50)  # any late progress report is delivered now
    np.testing.assert_array_equal(w.session.labels.array, before)
    np.testing.assert_array_equal(np.asarray(w.labels_layer.data), before)
    assert "cancelled" in w.panel.status.text()
    key(viewer, qtbot, Qt.Key_A)
    assert not [e for e in w.session.labels._undo if e[0] == "paint"]


def test_cancel_mid_run_leaves_the_layer_as_the_session(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build(inline=False, radius_z=14, gate_z=18)
    seed(w, viewer, qtbot)
    before = w.session.labels.array.copy()
    key(viewer, qtbot, Qt.Key_P)
    qtbot.waitUntil(w.session._predictor.reached.is_set, timeout=20_000)
    pending = viewer.layers["MedSAM pending"]
    qtbot.waitUntil(lambda: np.asarray(pending.data).any(), timeout=5000)  # the run's slices show...
    # ...but never in the Labels layer, so no cancel can leave one behind there
    np.testing.assert_array_equal(np.asarray(w.labels_layer.data), before)
    qtbot.mouseClick(w.panel.cancel_btn, Qt.LeftButton)
    w.session._predictor.gate.set()
    assert w.wait(20)
    qtbot.wait(50)
    np.testing.assert_array_equal(np.asarray(w.labels_layer.data), before)
    np.testing.assert_array_equal(w.session.labels.array, before)
    assert not np.asarray(pending.data).any()


# ---------------------------------------------------------------- 3: brush edits survive propagation
def test_repropagation_keeps_the_brush_edits(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build()
    seed(w, viewer, qtbot)
    key(viewer, qtbot, Qt.Key_P)
    obj = w.current_label
    layer = w.labels_layer
    ny, nx = w.session.shape_zyx[1:]
    # Add a blob outside the object on slice 14, and erase a blob inside it on slice 10.
    layer.brush_size = 9
    layer.selected_label = obj
    layer.paint((14, 10, 10), obj)
    added = (np.asarray(layer.data[14]) == obj) & ~w.truth[14]
    layer.paint((10, ny // 2, nx // 2), 0)
    erased = w.truth[10] & (np.asarray(layer.data[10]) == 0)
    assert added.sum() > 30 and erased.sum() > 30
    qtbot.waitUntil(lambda: (w.session.labels.array[14][added] == obj).all(), timeout=5000)
    key(viewer, qtbot, Qt.Key_P)  # re-propagate the whole object from its seed
    assert (w.session.labels.array[14][added] == obj).all()
    assert not (w.session.labels.array[10][erased] == obj).any()
    np.testing.assert_array_equal(np.asarray(layer.data), w.session.labels.array)
    # Undoing the painting takes the edits back for good: the next propagation does not restore them.
    while w.session.labels._undo and w.session.labels._undo[-1][0] != "paint":
        w.undo()
    key(viewer, qtbot, Qt.Key_Z, Qt.ControlModifier)
    assert not w.session.edits.get(obj)
    key(viewer, qtbot, Qt.Key_P)
    assert not (w.session.labels.array[14][added] == obj).any()


# ---------------------------------------------------------------- 6: small defects
@pytest.fixture
def notes(monkeypatch):
    import medsam_plugin.napari.widget.controller as mod

    seen = []
    monkeypatch.setattr(mod, "_notify", lambda kind, msg: seen.append((kind, msg)))
    return seen


def test_a_model_load_error_ends_the_busy_status_line(make, qtbot, notes, tmp_path):
    import shutil

    from qtpy.QtCore import Qt

    from medsam_plugin.model.registry import INTERACTIVE_FILE, packaged_weights_dir

    viewer, build = make
    w = build()
    # A checkpoint that passes the check when chosen, then vanishes before it is used.
    path = tmp_path / "mine.pth"
    shutil.copy(packaged_weights_dir() / INTERACTIVE_FILE, path)
    w.panel.model_combo.setEditText(str(path))
    w.change_model()
    assert w.session.model_name == str(path)
    path.unlink()
    w.set_slice(12)
    w.add_box(box_of(w.truth[12]))
    key(viewer, qtbot, Qt.Key_S)
    assert notes and notes[-1][0] == "error"
    assert "Segmenting slice" not in w.panel.status.text() or "failed" in w.panel.status.text()
    assert "failed" in w.panel.status.text()


def test_a_box_off_the_image_is_refused_with_a_sentence(make, qtbot, notes):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build()
    w.set_slice(12)
    ny, nx = w.session.shape_zyx[1:]
    w.add_box([nx + 10, 5, nx + 40, 30])
    key(viewer, qtbot, Qt.Key_S)
    assert w.pending is None and "outside the image" in notes[-1][1]
    assert not w.session.labels.objects  # and no empty object was made


def test_s_or_p_with_nothing_to_work_on_makes_no_object(make, qtbot, notes):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build()
    key(viewer, qtbot, Qt.Key_S)
    key(viewer, qtbot, Qt.Key_P)
    assert not w.session.labels.objects and w.panel.object_list.count() == 0
    assert "no prompt" in notes[0][1] and "no segmented slice" in notes[1][1]


def test_export_with_nothing_segmented_writes_nothing(make, tmp_path, notes):
    viewer, build = make
    w = build()
    w.add_object("empty")
    assert w.export(tmp_path / "out.nii.gz") is None
    assert not (tmp_path / "out.nii.gz").exists() and "nothing to export" in notes[-1][1]


def test_one_correction_is_one_undo(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build()
    seed(w, viewer, qtbot)
    key(viewer, qtbot, Qt.Key_P)
    before = w.session.labels.array.copy()
    obj = w.current_label
    # A negative click inside the object on slice 14 removes a part there (the fake answers
    # with the truth, so drop some of it from the truth to make the correction change voxels).
    w.truth[14:17, :, : w.truth.shape[2] // 2] = False
    w.set_slice(14)
    ny, nx = w.session.shape_zyx[1:]
    w.add_point((ny // 2, nx // 2 - 5), positive=False)
    key(viewer, qtbot, Qt.Key_S)
    qtbot.waitUntil(lambda: (w.session.labels.array != before).any() and not w._busy(), timeout=10_000)
    qtbot.wait(50)
    assert (w.session.labels.array[15] != before[15]).any()  # the correction went beyond its slice
    key(viewer, qtbot, Qt.Key_Z, Qt.ControlModifier)
    np.testing.assert_array_equal(w.session.labels.array, before)
    np.testing.assert_array_equal(np.asarray(w.labels_layer.data), before)
    assert obj in w.session.labels.objects


def test_removing_the_scan_during_propagation_raises_nothing(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build(inline=False, radius_z=14, gate_z=17)
    seed(w, viewer, qtbot)
    key(viewer, qtbot, Qt.Key_P)
    qtbot.waitUntil(w.session._predictor.reached.is_set, timeout=20_000)
    fake = w.session._predictor
    viewer.layers.remove(w.image_layer)
    fake.gate.set()
    assert w.wait(20)
    qtbot.wait(100)  # late reports and the end of the worker are delivered: none may raise
    assert w.session is None and "closed" in w.panel.status.text()


# ---------------------------------------------------------------- 5: restore
def test_restore_brings_seeds_and_the_slice_in_progress_back_and_is_not_overwritten(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build(policy="ask")
    seed(w, viewer, qtbot)
    key(viewer, qtbot, Qt.Key_P)
    obj = w.current_label
    saved = w.session.labels.array.copy()
    second = w.add_object("in progress")
    w.set_slice(12)
    ny, nx = w.session.shape_zyx[1:]
    w.add_box([nx // 2 - 5, ny // 2 - 5, nx // 2 + 5, ny // 2 + 5])
    key(viewer, qtbot, Qt.Key_S)  # shown, not accepted: then the process is killed
    assert w.pending is not None
    w.close()  # a kill -9 runs no handler; closing saves nothing either

    w2 = build(policy="ask")
    assert w2.panel.restore_btn.isEnabled()
    assert not w2.panel.restore_banner.isHidden() and "Restore autosave" in w2.panel.restore_banner.text()  # in the panel
    # New work before answering the offer must not replace the autosave.
    w2.add_object("new")
    w2.labels_layer.paint((5, 30, 30), 1)
    qtbot.waitUntil(lambda: w2.session.labels.array.any(), timeout=5000)
    qtbot.mouseClick(w2.panel.restore_btn, Qt.LeftButton)
    np.testing.assert_array_equal(w2.session.labels.array, saved)
    assert sorted(w2.session.seeds[obj]) == [12]  # P can go on from the seed
    assert w2.pending is not None and w2.pending[0] == second and w2.pending[1].z == 12
    assert np.asarray(viewer.layers["MedSAM pending"].data[12]).any()
    w2.select_object(obj)
    key(viewer, qtbot, Qt.Key_P)
    assert "no segmented slice" not in w2.panel.status.text() and "Propagated" in w2.panel.status.text()
