"""The interactive rules the napari widget used to hold, now in SegmentationSession (no Qt, fake predictor)."""

from __future__ import annotations

import json

import numpy as np

from fakes import FakePredictor, ellipsoid_zyx
from medsam_plugin.engine.propagation import bounding_box_xyxy, run_to_completion
from medsam_plugin.engine.session import mask_to_runs, runs_to_mask


def make_session(truth):
    from medsam_plugin.engine.propagation import StopRules
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import Volume

    session = SegmentationSession(Volume(np.zeros(truth.shape[::-1], np.float32), np.eye(4)), window="abdomen")
    session._predictor = FakePredictor(truth)
    session.stop_rules = StopRules(min_iou_with_previous=None)
    return session


TRUTH = ellipsoid_zyx(shape=(20, 40, 48), center=(10, 20, 24), radii=(6, 12, 15))


def propagated(z=10):
    s = make_session(TRUTH.copy())
    obj = s.add_object("blob").label_id
    s.segment_slice(obj, z, box_xyxy=bounding_box_xyxy(TRUTH[z]))
    run_to_completion(s.propagate(obj))
    return s, obj


def test_runs_round_trip():
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 9)) > 0.5, np.zeros((3, 4), bool), np.ones((3, 4), bool)):
        np.testing.assert_array_equal(runs_to_mask(mask_to_runs(mask), mask.shape), mask)


def test_what_prompts_mean_and_the_slice_result_not_accepted():
    s = make_session(TRUTH.copy())
    obj = s.add_object("blob").label_id
    assert not s.can_undo and not s.can_redo
    # a box on an empty slice starts over; the result is held, not accepted
    assert s.prepare_prompt(obj, 10, box_xyxy=bounding_box_xyxy(TRUTH[10])) is False
    pred = s.segment_slice(obj, 10, box_xyxy=bounding_box_xyxy(TRUTH[10]), commit=False)
    s.hold_pending(obj, pred)
    assert s.can_undo and not s.labels.array.any()
    # points without a box on the held slice refine it: it is accepted first, and they correct it
    assert s.prepare_prompt(obj, 10) is True
    assert s.pending is None and (s.labels.array[10] == obj).sum() == TRUTH[10].sum() and 10 in s.seeds[obj]
    # a result held on another slice is accepted when the next one is held
    s.hold_pending(obj, s.segment_slice(obj, 12, box_xyxy=bounding_box_xyxy(TRUTH[12]), commit=False))
    s.hold_pending(obj, s.segment_slice(obj, 8, box_xyxy=bounding_box_xyxy(TRUTH[8]), commit=False))
    assert (s.labels.array[12] == obj).any() and not (s.labels.array[8] == obj).any()
    # undo drops what is held first, then walks the history
    assert "preview" in s.undo() and s.pending is None and s.can_undo
    assert s.undo() and not (s.labels.array[12] == obj).any() and s.can_redo


def test_painting_refuses_locked_objects_and_accepts_the_held_result_first():
    s, obj = propagated()
    other = s.add_object("other").label_id
    s.set_locked(obj, True)
    painted = s.labels.array.copy()
    painted[10, 18:22, 22:26] = other  # over the locked object: refused
    painted[3, 0:2, 0:2] = other  # elsewhere: taken
    changed, refused = s.take_painting(painted)
    assert (changed, refused) == (4, 16)
    assert (s.labels.array[10, 18:22, 22:26] == obj).all() and (s.labels.array[3, 0:2, 0:2] == other).all()
    assert not s.set_locked(obj)  # toggles back
    s.clear_object(obj)
    held = s.segment_slice(other, 10, box_xyxy=bounding_box_xyxy(TRUTH[10]), commit=False)
    s.hold_pending(other, held)
    painted = s.labels.array.copy()
    painted[10, 20, 24] = obj  # a stroke through the held result: it is accepted, and the stroke wins
    s.take_painting(painted)
    assert s.pending is None and 10 in s.seeds[other] and s.labels.array[10, 20, 24] == obj
    assert (s.labels.array[10] == other).sum() == held.mask_yx.sum() - 1


def test_review_order_and_volumes():
    s, obj = propagated()
    conf = s.confidence_of(obj)
    order = []
    while (z := s.next_to_review(obj)) is not None:
        order.append(z)
    assert order == sorted((z for z in conf if z != 10), key=lambda z: (conf[z], z))
    run_to_completion(s.propagate(obj))  # a new run asks for its slices to be looked at again
    assert not s.reviewed[obj] and s.to_review(obj)
    assert np.isclose(s.volume_ml(obj), TRUTH.sum() * s.voxel_ml)


def test_the_autosave_state_brings_edits_overlaps_prompts_and_the_held_result_back():
    from medsam_plugin.engine.session import SegmentationSession

    s, obj = propagated()
    s.set_overlap("allow")
    over = s.add_object("over").label_id
    s.segment_slice(over, 10, box_xyxy=bounding_box_xyxy(TRUTH[10]))  # all of it held by obj
    assert s.overlapping_objects() == [over]
    painted = s.labels.array.copy()
    painted[12, 0:3, 0:3] = obj
    painted[9, 20, 24] = 0
    s.take_painting(painted)
    s.store_prompts(obj, fg=[[10, 20, 24]], boxes=[np.array([[10, 1, 1], [10, 1, 9], [10, 9, 9], [10, 9, 1]])])
    s.next_to_review(obj)
    s.hold_pending(obj, s.segment_slice(obj, 11, points_yx=np.array([[20, 24]]), point_labels=np.array([1]),
                                        commit=False))
    state = json.loads(json.dumps(s.to_state(current=obj)))  # what the autosave writes

    t = SegmentationSession(s.volume, window="abdomen")
    t._predictor = FakePredictor(TRUTH.copy())
    t.stop_rules = s.stop_rules
    assert t.from_state(s.labels.array.copy(), state) == obj
    assert t.overlap == "allow" and t.overlapping_objects() == [over]
    np.testing.assert_array_equal(t.object_mask(over), s.object_mask(over))
    assert sorted(t.edits[obj]) == [9, 12] and t.reviewed == s.reviewed
    np.testing.assert_array_equal(t.prompts_of(obj)["fg"], [[10, 20, 24]])
    assert t.pending[0] == obj and t.pending[1].z == 11
    np.testing.assert_array_equal(t.pending[1].mask_yx, s.pending[1].mask_yx)
    # the brush edits are edits again: a re-propagation keeps them
    t.drop_pending()
    run_to_completion(t.propagate(obj))
    assert (t.labels.array[12, 0:3, 0:3] == obj).all() and t.labels.array[9, 20, 24] == 0


def test_a_correction_keeps_the_answer_that_honours_the_clicks_and_changes_least():
    """Corrective clicks on a model that reads clicks and masks: the session asks several ways and
    keeps the answer honouring most clicks, then the smallest change; a way that erases the
    object (as repeated background clicks did to a ring-shaped lesion) is passed over."""
    from types import SimpleNamespace

    class Eraser(FakePredictor):
        """With its box and full-strength logits, a background click erases the whole slice."""

        spec = SimpleNamespace(reads_points=True, reads_masks=True, click_refine_passes=0)

        def predict(self, z, points_yx=None, point_labels=None, box_xyxy=None, mask_logits_256=None, multimask=False):
            out = super().predict(z, points_yx, point_labels, box_xyxy, mask_logits_256, multimask)
            if mask_logits_256 is None or points_yx is None:
                return out
            mask = out.mask_yx.copy()
            if box_xyxy is not None and np.abs(mask_logits_256).max() > 4 and 0 in list(point_labels):
                mask[:] = False
            else:  # the other ways take away a disc round each background click
                yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
                for (y, x), k in zip(np.asarray(points_yx), point_labels):
                    if k == 0:
                        mask &= (yy - y) ** 2 + (xx - x) ** 2 > 9
            return SlicePrediction(z=out.z, mask_yx=mask, logits_256=out.logits_256, iou=out.iou, prompt=out.prompt)

    from medsam_plugin.engine.predictor import SlicePrediction

    s = make_session(TRUTH.copy())
    s._predictor = Eraser(TRUTH.copy())
    obj = s.add_object("blob").label_id
    s.segment_slice(obj, 10, box_xyxy=bounding_box_xyxy(TRUTH[10]))
    before = s.labels.array[10] == obj
    calls = len(s.predictor.calls)
    pred = s.segment_slice(obj, 10, points_yx=np.array([[20.0, 24.0]]), point_labels=np.array([0]),
                           use_current_mask=True)
    assert len(s.predictor.calls) - calls == 3  # with the box, without it, at half strength
    assert not pred.mask_yx[20, 24] and pred.mask_yx.sum() >= before.sum() - 40  # a disc, not the slice
    assert pred.prompt["box_xyxy"] is not None  # the next correction still has the slice's box
    # A second click: four ways (the newest click alone too), and both clicks stay honoured.
    pred = s.segment_slice(obj, 10, points_yx=np.array([[20.0, 24.0], [20.0, 14.0]]), point_labels=np.array([0, 0]),
                           use_current_mask=True)
    assert not pred.mask_yx[20, 24] and not pred.mask_yx[20, 14] and pred.mask_yx.sum() > 0.8 * before.sum()



def test_a_background_click_the_model_ignores_carves_out_the_clicked_region():
    """A model that keeps a region whatever the background clicks say: the session takes out the
    connected part of the mask round the click that looks like the click (by intensity), and
    nothing when that part is half the mask or more."""
    from types import SimpleNamespace

    class Stubborn(FakePredictor):
        spec = SimpleNamespace(reads_points=True, reads_masks=True, click_refine_passes=0)

    s = make_session(TRUTH.copy())
    s._predictor = Stubborn(TRUTH.copy())
    image = np.zeros(TRUTH.shape, np.uint8)
    image[TRUTH] = 100
    image[:, :, 30:][TRUTH[:, :, 30:]] = 200  # the object's right part (a fifth of it) is brighter
    s.predictor.volume = image
    obj = s.add_object("blob").label_id
    s.segment_slice(obj, 10, box_xyxy=bounding_box_xyxy(TRUTH[10]))
    before = TRUTH[10]
    click = dict(points_yx=np.array([[20.0, 34.0]]), point_labels=np.array([0]), use_current_mask=True)
    pred = s.segment_slice(obj, 10, **click)
    assert not pred.mask_yx[20, 34] and not pred.mask_yx[:, 30:].any()  # the bright part is gone
    assert pred.prompt["carved"] is True  # so the widget can say what happened
    assert np.array_equal(pred.mask_yx[:, :30], before[:, :30])  # the rest is untouched
    from medsam_plugin.engine.session import mask_logits_256

    carved = mask_logits_256(before & ~pred.mask_yx) > 0  # in the decoder's 256 x 256 frame
    assert carved.any() and (pred.logits_256[carved] < 0).all()  # the next correction starts from it
    # Where the click's region is most of the mask, the slice is not erased.
    image[TRUTH] = 100
    s.undo()
    assert np.array_equal(s.segment_slice(obj, 10, **click).mask_yx, before)


def test_a_correction_lengthens_the_object_by_at_most_its_own_length():
    """A foreground click on a slice past the object's end walks on from there, but no further
    from the object than the object is long (an oversized answer below a lesion walked 70 slices
    through healthy brain)."""
    from medsam_plugin.engine.propagation import StopRules

    column = np.zeros((20, 40, 48), bool)
    column[:, 12:28, 16:32] = True  # the model finds "the object" on every slice
    s = make_session(column)
    obj = s.add_object("column").label_id
    s.segment_slice(obj, 10, box_xyxy=bounding_box_xyxy(column[10]))
    run_to_completion(s.propagate(obj, stop=StopRules(min_iou_with_previous=None, max_distance=2)))
    assert np.flatnonzero(s.labels.array.any(axis=(1, 2))).tolist() == [8, 9, 10, 11, 12]
    pred = s.segment_slice(obj, 6, points_yx=np.array([[20.0, 24.0]]), point_labels=np.array([1]),
                           use_current_mask=True, commit=False)
    run_to_completion(s.correct(obj, pred))
    # 5 slices long, so the walk from slice 6 may reach slice 3 and no further.
    assert np.flatnonzero(s.labels.array.any(axis=(1, 2))).tolist() == list(range(3, 13))


def test_a_click_past_the_walks_end_is_answered_as_the_walk_would_have_asked():
    """A foreground click on a slice the walk never reached: the clicks alone leak (a model that
    never saw the object's size there answers a large region); the session also asks with the
    nearest result's propagation box and logits and keeps the answer nearest that result's size.
    Before, the leak was kept (3254 px for a 969 px tumour) and carried on by the re-propagation."""
    from types import SimpleNamespace

    from medsam_plugin.engine.predictor import SlicePrediction
    from medsam_plugin.engine.propagation import StopRules

    class Leaky(FakePredictor):
        """Without a box, clicks flood the whole slice unless a dense prompt says the object is
        smaller (its own flood fed back stays a flood, as a leak refined does)."""

        spec = SimpleNamespace(reads_points=True, reads_masks=True, click_refine_passes=1)

        def predict(self, z, points_yx=None, point_labels=None, box_xyxy=None, mask_logits_256=None, multimask=False):
            out = super().predict(z, points_yx, point_labels, box_xyxy, mask_logits_256, multimask)
            sized = mask_logits_256 is not None and (np.asarray(mask_logits_256) > 0).mean() < 0.5
            if points_yx is not None and box_xyxy is None and not sized:
                flood = np.ones_like(out.mask_yx)
                return SlicePrediction(z=out.z, mask_yx=flood, logits_256=np.full((256, 256), 5.0, np.float32),
                                       iou=0.9, prompt=out.prompt)
            return out

    s = make_session(TRUTH.copy())
    s._predictor = Leaky(TRUTH.copy())
    obj = s.add_object("blob").label_id
    s.segment_slice(obj, 10, box_xyxy=bounding_box_xyxy(TRUTH[10]))
    run_to_completion(s.propagate(obj, stop=StopRules(min_iou_with_previous=None, max_distance=2)))
    assert np.flatnonzero(s.labels.array.any(axis=(1, 2))).tolist() == [8, 9, 10, 11, 12]
    pred = s.segment_slice(obj, 14, points_yx=np.array([[20.0, 24.0]]), point_labels=np.array([1]),
                           use_current_mask=True, commit=False)
    assert pred.mask_yx[20, 24]  # the click is honoured
    assert pred.mask_yx.sum() < 2 * TRUTH[12].sum()  # no flood: the object's size, not the slice's
    assert np.array_equal(pred.mask_yx, TRUTH[14] & pred.mask_yx)
    assert pred.prompt["box_xyxy"] is None and pred.prompt["point_labels"].tolist() == [1]
    result = run_to_completion(s.correct(obj, pred))
    assert result is not None and (s.labels.array == obj).sum() <= TRUTH.sum()


def test_cancel_while_a_slice_is_encoded_changes_nothing():
    """Issue 21: cancel acts within a slice: after its encoding, before any decoder call (and between a
    click's refining passes)."""
    import threading

    from medsam_plugin.engine.propagation import PropagationCancelled

    cancel = threading.Event()

    class SlowToEncode(FakePredictor):
        def ensure_embedding(self, z):
            cancel.set()
            return True

    s = make_session(TRUTH.copy())
    s._predictor = SlowToEncode(TRUTH.copy())
    obj = s.add_object("blob").label_id
    try:
        s.segment_slice(obj, 10, box_xyxy=bounding_box_xyxy(TRUTH[10]), cancel=cancel)
        raise AssertionError("the cancel was not seen")
    except PropagationCancelled as err:
        assert "Segmenting slice 10 was cancelled; nothing was changed." in str(err)
    assert s.predictor.calls == [] and not s.labels.array.any() and not s.seeds[obj]


def test_a_correction_asks_its_ways_in_one_batch():
    from types import SimpleNamespace

    class Reader(FakePredictor):
        spec = SimpleNamespace(reads_points=True, reads_masks=True, click_refine_passes=0)

    s = make_session(TRUTH.copy())
    s._predictor = Reader(TRUTH.copy())
    obj = s.add_object("blob").label_id
    s.segment_slice(obj, 10, box_xyxy=bounding_box_xyxy(TRUTH[10]))
    s.segment_slice(obj, 10, points_yx=np.array([[20.0, 24.0], [5.0, 5.0]]), point_labels=np.array([1, 0]),
                    use_current_mask=True)
    assert s.predictor.batches == [4]  # with and without the box, logits halved, newest click alone


def test_a_correction_never_rewalks_the_slices_between_it_and_the_users_other_prompts():
    """A correction walks outwards only. Walking inwards too, a background click near a sarcoma's
    end carried its shrunken answer over ten good slices towards the seed (3D Dice 0.785 -> 0.496
    in two clicks)."""

    class Shrinking(FakePredictor):
        """Answers a background click with a small core of the object (as an over-eager model does);
        a walk from it, prompted with its box, then shrinks every slice it reaches."""

        def predict(self, z, points_yx=None, point_labels=None, box_xyxy=None, mask_logits_256=None, multimask=False):
            out = super().predict(z, points_yx, point_labels, box_xyxy, mask_logits_256, multimask)
            if point_labels is not None and 0 in np.asarray(point_labels):
                core = np.zeros_like(out.mask_yx)
                core[17:23, 21:27] = True
                out.mask_yx &= core
            return out

    s, obj = propagated(z=10)
    s._predictor = Shrinking(TRUTH.copy())
    before = s.labels.array == obj
    pred = s.segment_slice(obj, 6, points_yx=np.array([[20.0, 5.0]]), point_labels=np.array([0]),
                           use_current_mask=True, commit=False)
    run_to_completion(s.correct(obj, pred))
    after = s.labels.array == obj
    assert after[6].sum() < before[6].sum()  # the corrected slice took the correction
    np.testing.assert_array_equal(after[7:], before[7:])  # slices 7-9 lie between it and the seed on 10
    assert after[5].sum() < before[5].sum()  # outwards, the correction is carried on
