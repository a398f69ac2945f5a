"""The workflow rules the CLI, the evaluation and napari share, in SegmentationSession (no Qt, fake predictor)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fakes import FakePredictor, ellipsoid_zyx
from medsam_plugin.engine.propagation import (PropagationCancelled, StopPolicy, StopRules, bounding_box_xyxy,
                                             run_to_completion)


def make_session(truth):
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import Volume

    session = SegmentationSession(Volume(np.zeros(truth.shape[::-1], np.float32), np.eye(4)), window="abdomen")
    session._predictor = FakePredictor(truth)
    session.stop_rules = StopRules(min_iou_with_previous=None)  # the ellipsoid's tips overlap little
    return session


@pytest.fixture
def truth():
    return ellipsoid_zyx(shape=(20, 40, 48), center=(10, 20, 24), radii=(6, 12, 15))


def seeded(truth, z=10):
    s = make_session(truth)
    obj = s.add_object("blob").label_id
    s.segment_slice(obj, z, box_xyxy=bounding_box_xyxy(truth[z]))
    return s, obj


def test_a_cancel_after_the_last_slice_commits_nothing(truth):
    s, obj = seeded(truth)
    cancel = threading.Event()
    real = s._predictor.predict

    def predict(z, **kw):  # the user presses Cancel while the model works on the last slice
        if z == truth.shape[0] - 1:
            cancel.set()
        return real(z, **kw)

    s._predictor.predict = predict
    before = s.labels.array.copy()
    s.stop_rules = StopRules(min_iou_with_previous=None, policy=StopPolicy.off())
    s._predictor.truth = np.ones_like(truth)  # so the walk up reaches the last slice
    with pytest.raises(PropagationCancelled):
        run_to_completion(s.propagate(obj, "up", cancel=cancel))
    np.testing.assert_array_equal(s.labels.array, before)


def test_brush_edits_survive_repropagation_and_go_with_undo(truth):
    s, obj = seeded(truth)
    run_to_completion(s.propagate(obj))
    painted = s.labels.array.copy()
    painted[12, 0:3, 0:3] = obj  # added outside the object
    painted[8][painted[8] == obj] = 0  # slice 8 erased by hand
    s.paint(painted)
    run_to_completion(s.propagate(obj))
    assert (s.labels.array[12, 0:3, 0:3] == obj).all() and not (s.labels.array[8] == obj).any()
    s.undo()  # the propagation (it changed nothing: edits kept) or the paint
    while s.labels.can_undo and s.edits.get(obj):
        s.undo()
    run_to_completion(s.propagate(obj))
    assert not (s.labels.array[12, 0:3, 0:3] == obj).any() and (s.labels.array[8] == obj).any()


def test_correct_is_one_undo_step(truth):
    s, obj = seeded(truth)
    run_to_completion(s.propagate(obj))
    before = s.labels.array.copy()
    s._predictor.truth = truth.copy()
    s._predictor.truth[11:15, :, :24] = False  # the structure is smaller above slice 10 than found
    pred = s.segment_slice(obj, 12, points_yx=[[20, 10]], point_labels=[0], use_current_mask=True, commit=False)
    result = run_to_completion(s.correct(obj, pred))
    assert result is not None and (s.labels.array[13] != before[13]).any()
    assert s.undo().startswith("correct")
    np.testing.assert_array_equal(s.labels.array, before)


def test_rename_and_clear_object_reset_what_the_object_was(truth):
    s, obj = seeded(truth)
    s.rename(obj, "  spleen ")
    assert s.labels.objects[obj].name == "spleen"
    with pytest.raises(ValueError, match="needs a name"):
        s.rename(obj, " ")
    run_to_completion(s.propagate(obj))
    s.stop_here(obj, 14)
    assert s.stop_slices[obj] == {14}
    s.clear_object(obj)
    assert not s.stop_slices.get(obj) and not s.seeds[obj] and not s.confidence_of(obj)


def test_to_state_and_from_state_bring_the_work_back_with_its_seeds(truth):
    import json

    s, obj = seeded(truth)
    run_to_completion(s.propagate(obj))
    s.stop_here(obj, 15)
    s.set_overlap("allow")
    state = json.loads(json.dumps(s.to_state()))  # what the autosave writes
    t = make_session(truth)
    t.from_state(s.labels.array.copy(), state)
    np.testing.assert_array_equal(t.labels.array, s.labels.array)
    assert t.labels.objects[obj].name == "blob" and t.stop_slices[obj] == {15} and t.overlap == "allow"
    assert sorted(t.seeds[obj]) == [10]
    np.testing.assert_array_equal(t.seeds[obj][10].mask_yx, s.labels.array[10] == obj)
    result = run_to_completion(t.propagate(obj))  # propagation goes on from the restored seed
    assert max(result.slices) == 14 and min(result.slices) < 10


def test_a_background_click_correction_never_makes_the_object_longer(truth):
    """A remove-click says "less here": its re-propagation stays inside the object's z-extent,
    while an add-click may extend it."""
    s, obj = seeded(truth)
    s.stop_rules = StopRules(policy=StopPolicy(min_iou_previous=None), max_distance=2)
    run_to_completion(s.propagate(obj))
    before = np.flatnonzero((s.labels.array == obj).any(axis=(1, 2)))
    assert (before[0], before[-1]) == (8, 12)  # held to 2 slices from the seed
    s.stop_rules = StopRules(policy=StopPolicy(min_iou_previous=None))
    z = int(before[-1])  # the object's last slice; the fake model would walk on to the truth's end (15)
    s.segment_slice(obj, z, points_yx=np.array([[2.0, 2.0]]), point_labels=np.array([0]), use_current_mask=True)
    run_to_completion(s.propagate(obj, from_slice=z))
    after = np.flatnonzero((s.labels.array == obj).any(axis=(1, 2)))
    assert after[-1] == before[-1]
    s.segment_slice(obj, z, points_yx=np.array([[20.0, 24.0]]), point_labels=np.array([1]), use_current_mask=True)
    run_to_completion(s.propagate(obj, from_slice=z))
    assert np.flatnonzero((s.labels.array == obj).any(axis=(1, 2)))[-1] > before[-1]
