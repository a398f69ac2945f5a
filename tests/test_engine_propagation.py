"""Propagation, stop rules, multi-seed filling, cancel: on a fake predictor with a known object."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fakes import FakePredictor, ellipsoid_zyx
from medsam_plugin.engine.propagation import (
    PROMPT_MODES, PropagationCancelled, StopRules, bounding_box_xyxy, interior_point_yx, mask_iou,
    prompt_from_previous, propagate, run_to_completion)


# Walk-logic tests turn the overlap rule off: the ellipsoid's one-pixel tips overlap little.
NO_OVERLAP_RULE = StopRules(min_iou_with_previous=None)


def seed(predictor, z):
    return {z: predictor.predict(z, box_xyxy=bounding_box_xyxy(predictor.truth[z]))}


def test_one_seed_walks_both_ways_until_the_object_ends():
    truth = ellipsoid_zyx()
    fake = FakePredictor(truth)
    steps = []
    result = run_to_completion(propagate(fake, seed(fake, 10), stop=NO_OVERLAP_RULE), callback=steps.append)
    present = set(np.flatnonzero(truth.any(axis=(1, 2))))
    assert set(result.slices) == present
    assert np.array_equal(result.mask_zyx(truth.shape), truth)
    assert all("empty mask" in reason for reason in result.stopped.values())
    assert steps[-1].done == steps[-1].total and [s.z for s in steps if s.z is not None] == [
        z for z in range(9, -1, -1) if z in present] + [z for z in range(11, 20) if z in present]


def test_each_slice_between_two_seeds_is_prompted_from_its_nearest_seed():
    truth = ellipsoid_zyx()
    fake = FakePredictor(truth)
    seeds = {**seed(fake, 6), **seed(fake, 13)}
    fake.calls.clear()
    result = run_to_completion(propagate(fake, seeds, direction="both", stop=NO_OVERLAP_RULE))
    visited = [z for z, _ in fake.calls]
    # 6 walks up to the middle (9), 13 walks down to 10: every gap slice visited exactly once.
    assert [z for z in visited if 6 < z < 13] == [7, 8, 9, 12, 11, 10]
    assert result.stopped["up from 6"] == result.stopped["down from 13"] == "met the walk from the neighbouring seed"
    assert set(result.slices) == set(np.flatnonzero(truth.any(axis=(1, 2))))


@pytest.mark.parametrize("direction, expected", [("up", range(10, 17)), ("down", range(4, 11))])
def test_direction_limits_the_walk(direction, expected):
    fake = FakePredictor(ellipsoid_zyx())
    result = run_to_completion(propagate(fake, seed(fake, 10), direction=direction, stop=NO_OVERLAP_RULE))
    assert result.slices == list(expected)


def test_stop_rules_stop_slices_range_and_distance():
    fake = FakePredictor(ellipsoid_zyx())
    rules = StopRules(stop_slices=frozenset({13}), z_range=(7, 19))
    result = run_to_completion(propagate(fake, seed(fake, 10), stop=rules))
    assert result.slices == [7, 8, 9, 10, 11, 12]
    assert "stop slice at slice 13" in result.stopped["up from 10"]
    assert "z-range limit at slice 6" in result.stopped["down from 10"]
    result = run_to_completion(propagate(fake, seed(fake, 10), stop=StopRules(max_distance=2)))
    assert result.slices == [8, 9, 10, 11, 12]


def test_low_overlap_stops_a_jump_to_another_structure():
    truth = ellipsoid_zyx()
    jumped = truth.copy()
    jumped[13] = np.roll(truth[13], 20, axis=1)  # slice 13 'finds' something elsewhere
    fake = FakePredictor(jumped)
    result = run_to_completion(propagate(fake, seed(fake, 10), mode="mask"))
    assert max(result.slices) == 12
    assert "low overlap" in result.stopped["up from 10"]
    relaxed = run_to_completion(propagate(fake, seed(fake, 10), mode="mask", stop=StopRules(min_iou_with_previous=None)))
    assert 13 in relaxed.slices


def test_cancel_raises_before_the_next_slice_is_predicted():
    fake = FakePredictor(ellipsoid_zyx())
    cancel = threading.Event()
    gen = propagate(fake, seed(fake, 10), cancel=cancel)
    next(gen), next(gen)
    calls = len(fake.calls)
    cancel.set()
    with pytest.raises(PropagationCancelled):
        next(gen)
    assert len(fake.calls) == calls


def test_cancel_during_a_slices_encoding_acts_before_its_decoding():
    """Issue 21: cancel acted only between slices; a slice's encoding (most of its time) now ends
    with a check, so the decoder never runs on the slice during which cancel was pressed."""
    cancel = threading.Event()

    class SlowToEncode(FakePredictor):
        def ensure_embedding(self, z):
            if z == 12:
                cancel.set()  # the user presses cancel while slice 12 is being encoded
            return True

    fake = SlowToEncode(ellipsoid_zyx())
    with pytest.raises(PropagationCancelled):
        run_to_completion(propagate(fake, seed(fake, 10), direction="up", cancel=cancel))
    assert [z for z, _ in fake.calls] == [10, 11]


@pytest.mark.parametrize("mode", PROMPT_MODES)
def test_every_mode_builds_the_prompts_it_names(mode):
    fake = FakePredictor(ellipsoid_zyx())
    prev = fake.predict(10, box_xyxy=bounding_box_xyxy(fake.truth[10]))
    kwargs = prompt_from_previous(prev, mode, fake.truth.shape[1:])
    assert ("box_xyxy" in kwargs) == ("box" in mode)
    assert ("mask_logits_256" in kwargs) == ("mask" in mode)
    assert ("points_yx" in kwargs) == ("points" in mode)
    if "box" in mode:
        x0, y0, x1, y1 = kwargs["box_xyxy"]
        bx0, by0, bx1, by1 = bounding_box_xyxy(prev.mask_yx)
        assert x0 < bx0 and y0 < by0 and x1 > bx1 and y1 > by1  # widened, as MedSAM's 3D script does
    if "points" in mode:
        r, c = kwargs["points_yx"][0].astype(int)
        assert prev.mask_yx[r, c]


def test_bad_arguments_are_explained():
    fake = FakePredictor(ellipsoid_zyx())
    with pytest.raises(ValueError, match="at least one seeded slice"):
        run_to_completion(propagate(fake, {}))
    with pytest.raises(ValueError, match="Unknown propagation mode"):
        run_to_completion(propagate(fake, seed(fake, 10), mode="telepathy"))


def test_geometry_helpers():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    assert bounding_box_xyxy(mask).tolist() == [3, 2, 8, 4]
    assert bounding_box_xyxy(np.zeros((3, 3), bool)) is None
    assert tuple(interior_point_yx(mask).astype(int)) == (3, 5) or mask[tuple(interior_point_yx(mask).astype(int))]
    assert mask_iou(mask, mask) == 1.0 and mask_iou(mask, ~mask) == 0.0


def _fake_session(truth):
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import Volume

    # With an identity affine the axial view of an (i, j, k) array is (k, j, i): reverse the shape.
    session = SegmentationSession(Volume(np.zeros(truth.shape[::-1], np.float32), np.eye(4)), window="abdomen")
    assert session.shape_zyx == truth.shape
    session._predictor = FakePredictor(truth)
    return session


def test_session_undo_restores_seeds_and_per_object_stop_slices():
    truth = ellipsoid_zyx(shape=(20, 40, 48))
    session = _fake_session(truth)
    session_truth = truth
    obj = session.add_object("blob")
    session.segment_slice(obj.label_id, 10, box_xyxy=bounding_box_xyxy(session_truth[10]))
    session.segment_slice(obj.label_id, 12, box_xyxy=bounding_box_xyxy(session_truth[12]))
    assert sorted(session.seeds[obj.label_id]) == [10, 12]
    session.undo()
    assert sorted(session.seeds[obj.label_id]) == [10]
    session.redo()
    assert sorted(session.seeds[obj.label_id]) == [10, 12]
    session.mark_stop(obj.label_id, 15)
    session.stop_rules = NO_OVERLAP_RULE
    result = run_to_completion(session.propagate(obj.label_id))
    assert max(result.slices) == 14 and "stop slice" in result.stopped["up from 12"]
    other = session.add_object("other")
    session.segment_slice(other.label_id, 16, box_xyxy=bounding_box_xyxy(session_truth[16]))
    assert 16 in run_to_completion(session.propagate(other.label_id)).slices  # marks are per object
    session.clear_object(obj.label_id)
    assert session.seeds[obj.label_id] == {} and not (session.labels.array == obj.label_id).any()
    session.undo()
    assert sorted(session.seeds[obj.label_id]) == [10, 12] and (session.labels.array == obj.label_id).any()


def test_session_set_model_keeps_the_work_and_drops_the_old_models_embeddings():
    truth = ellipsoid_zyx(shape=(20, 40, 48))
    session = _fake_session(truth)
    session.stop_rules, session.mode = NO_OVERLAP_RULE, "box+mask"
    obj = session.add_object("blob")
    session.segment_slice(obj.label_id, 10, box_xyxy=bounding_box_xyxy(truth[10]))
    session.segment_slice(obj.label_id, 12, box_xyxy=bounding_box_xyxy(truth[12]))
    session.mark_stop(obj.label_id, 15)
    session._cache.put(10, np.ones((256, 64, 64), np.float32))
    labels, window = session.labels.array.copy(), session.window

    session.set_model("sam_vit_b", "cpu")
    assert (session.model_name, session.device, session.model_loaded) == ("sam_vit_b", "cpu", False)
    assert 10 not in session._cache and session._cache.bytes_in_memory == 0
    np.testing.assert_array_equal(session.labels.array, labels)
    assert session.labels.objects[obj.label_id].name == "blob"
    assert sorted(session.seeds[obj.label_id]) == [10, 12] and session.stop_slices[obj.label_id] == {15}
    assert session.stop_rules == NO_OVERLAP_RULE and session.mode == "box+mask" and session.window == window
    # The undo history still restores this session's seeds.
    session.undo()
    assert sorted(session.seeds[obj.label_id]) == [10] and not (session.labels.array[12] == obj.label_id).any()
    # The next propagation uses the new model and still honours the stop slice.
    session._predictor = FakePredictor(truth)
    result = run_to_completion(session.propagate(obj.label_id))
    assert max(result.slices) == 14


def test_an_empty_seed_ends_its_walks_with_a_reason():
    fake = FakePredictor(ellipsoid_zyx())
    empty = fake.predict(2, box_xyxy=[0, 0, 3, 3])  # the object is not on slice 2
    assert not empty.mask_yx.any()
    result = run_to_completion(propagate(fake, {2: empty, **seed(fake, 10)}, stop=NO_OVERLAP_RULE))
    assert "seed on slice 2 is empty" in result.stopped["down from 2"]
    assert 11 in result.slices  # the other seed still walks


def test_a_correction_repropagates_only_until_the_result_agrees_again():
    truth = ellipsoid_zyx(shape=(20, 40, 48))
    session = _fake_session(truth)
    session.stop_rules = NO_OVERLAP_RULE
    obj = session.add_object("blob")
    session.segment_slice(obj.label_id, 10, box_xyxy=bounding_box_xyxy(truth[10]))
    run_to_completion(session.propagate(obj.label_id))
    # Spoil slices 13 and 14 as a drifting walk would, then correct slice 12.
    spoiled = session.labels.array.copy()
    spoiled[13:15][spoiled[13:15] == obj.label_id] = 0
    session.labels.set_array(spoiled, "drift")
    calls = len(session.predictor.calls)
    session.segment_slice(obj.label_id, 12, box_xyxy=bounding_box_xyxy(truth[12]))
    result = run_to_completion(session.propagate(obj.label_id, from_slice=12))
    visited = [z for z, _ in session.predictor.calls[calls + 1:]]
    # Slice 11 lies between the correction and the seed on 10: it is left as it is. Upwards, 15
    # already agrees: the walk ends there.
    assert visited == [13, 14, 15]
    assert result.stopped == {"down from 12": "z-range limit at slice 11",
                              "up from 12": "agrees with the existing result at slice 15"}
    assert np.array_equal(session.labels.array == obj.label_id, truth)
    session.stop_here(obj.label_id, 15)
    assert not (session.labels.array[15:] == obj.label_id).any() and (session.labels.array[14] == obj.label_id).any()
