"""Issue 10: span report, gap fill between seeds, stop signals, stop policy and per-slice confidence.

Fake predictors and synthetic volumes for the logic; one test with the real weights on the spleen.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fakes import FakePredictor, ellipsoid_zyx
from medsam_plugin.engine.predictor import SlicePrediction
from medsam_plugin.engine.propagation import (
    DEFAULT_POLICY, FROM_POLICY, LEGACY_POLICY, SliceSignals, StopPolicy, StopRules, bounding_box_xyxy,
    propagate, run_to_completion, slice_confidence, slice_signals, stability_score)
from medsam_plugin.evaluation.span import format_span, span_report

OFF = StopRules(policy=StopPolicy.off())


def seed(predictor, z):
    return {z: predictor.predict(z, box_xyxy=bounding_box_xyxy(predictor.truth[z]))}


def seeds(predictor, *zs):
    out = {}
    for z in zs:
        out.update(seed(predictor, z))
    return out


def filled(result, lo, hi):
    return [z for z in range(lo, hi + 1) if z in result.predictions and result.predictions[z].mask_yx.any()]


# ------------------------------------------------------------------------------ span report
def test_span_report_signs_and_within_one():
    truth = np.zeros((30, 8, 8), bool)
    truth[5:21, 2:6, 2:6] = True  # slices 5..20
    pred = np.zeros_like(truth)
    pred[3:20, 3:5, 3:5] = True  # 3..19: two past the low end, one short at the high end
    r = span_report(pred, truth)
    assert r["pred_range"] == [3, 19] and r["truth_range"] == [5, 20]
    assert (r["overshoot_low"], r["overshoot_high"]) == (2, -1) and r["ends_within_1"] is False
    pred[3:5] = False  # now 5..19
    r = span_report(pred, truth)
    assert (r["overshoot_low"], r["overshoot_high"], r["ends_within_1"]) == (0, -1, True)
    assert format_span(r) == "pred 5-19 truth 5-20 ends +0/-1"


def test_span_report_of_an_empty_prediction():
    truth = np.zeros((10, 4, 4), bool)
    truth[2:4] = True
    r = span_report(np.zeros_like(truth), truth)
    assert r["pred_range"] is None and r["truth_range"] == [2, 3]
    assert r["overshoot_low"] is None and r["ends_within_1"] is False
    assert "empty" in format_span(r)
    with pytest.raises(ValueError, match="same"):
        span_report(np.zeros((3, 4, 4), bool), truth)


# ------------------------------------------------------------------------------ gap fill
def shifted_column(shape=(21, 40, 48), z_range=(2, 18), shift_from=None, shift=20):
    """A box-shaped object on slices z_range; from slice `shift_from` on it sits `shift` px to the
    right, so a box carried across that slice boundary clips the object to a sliver (the walk
    rejects it for low overlap), while a walk coming from the other side passes it."""
    truth = np.zeros(shape, bool)
    truth[z_range[0]: z_range[1] + 1, 10:30, 5:25] = True
    if shift_from is not None:
        truth[shift_from: z_range[1] + 1] = np.roll(truth[shift_from: z_range[1] + 1], shift, axis=2)
    return truth


def test_when_the_lower_walk_stops_early_the_upper_walk_fills_the_gap():
    fake = FakePredictor(shifted_column(shift_from=8))
    result = run_to_completion(propagate(fake, seeds(fake, 4, 16), direction="both"))
    # The walk up from 4 is rejected at 8 (its box from slice 7 misses most of slice 8) ...
    assert result.stopped["up from 4"] == "low overlap with previous slice at slice 8"
    # ... so the walk down from 16 carries on past the middle (10) down to 8.
    assert "carried on to slice 8" in result.stopped["down from 16"]
    assert filled(result, 4, 16) == list(range(4, 17))
    np.testing.assert_array_equal(result.mask_zyx(fake.truth.shape)[4:17], fake.truth[4:17])


def test_when_the_upper_walk_stops_early_the_lower_walk_carries_on():
    fake = FakePredictor(shifted_column(shift_from=13))
    steps = []
    result = run_to_completion(propagate(fake, seeds(fake, 4, 16), direction="both"), callback=steps.append)
    assert result.stopped["down from 16"] == "low overlap with previous slice at slice 12"
    assert "carried on to slice 12" in result.stopped["up from 4"]
    assert filled(result, 4, 16) == list(range(4, 17))
    # Progress stays monotonic and ends at its total although slice 12 was tried twice.
    done = [s.done for s in steps]
    assert done == sorted(done) and steps[-1].done == steps[-1].total


def test_the_old_behaviour_would_have_left_the_gap_empty():
    """Guards the test above against a fake that never stops: each seed alone stops at the shift."""
    fake = FakePredictor(shifted_column(shift_from=8))
    alone = run_to_completion(propagate(fake, seed(fake, 4), direction="up"))
    assert max(alone.slices) == 7


def test_a_user_stop_slice_still_splits_the_gap():
    fake = FakePredictor(shifted_column())
    rules = StopRules(stop_slices=frozenset({6}))
    result = run_to_completion(propagate(fake, seeds(fake, 4, 16), stop=rules))
    assert filled(result, 4, 16) == [4, 5] + list(range(7, 17))
    assert result.stopped["up from 4"] == "stop slice at slice 6"
    assert result.stopped["down from 16"] == "stop slice at slice 6"


def test_a_real_end_between_two_seeds_is_not_filled():
    truth = shifted_column()
    truth[9:12] = False  # two objects, really: nothing on slices 9..11
    fake = FakePredictor(truth)
    result = run_to_completion(propagate(fake, seeds(fake, 4, 16)))
    assert filled(result, 4, 16) == [4, 5, 6, 7, 8, 12, 13, 14, 15, 16]
    assert "empty mask" in result.stopped["up from 4"] and "empty mask" in result.stopped["down from 16"]


def tissue_change_between(truth, zs):
    """A fake whose object looks like another tissue on slices `zs` (mean intensity far from the
    seeds'), so walks from both sides stop there on "intensity unlike the seed's"."""
    fake = FakePredictor(truth)
    fake.volume = np.where(truth, 120, 30).astype(np.uint8)
    fake.volume[truth & (np.arange(truth.shape[1])[None, :, None] % 2 == 0)] = 130  # texture: seed std 5
    for z in zs:
        fake.volume[z][truth[z]] = 250
    return fake


INTENSITY = StopRules(policy=StopPolicy(min_iou_previous=None, max_intensity_shift=4.0))


def test_slices_between_two_seeds_are_filled_when_both_walks_stop_early():
    """Issue 21: the BraTS 2021 oedema kept slices 51-55 empty between two boxes, each walk stopped on
    "intensity unlike the seed's". Between two seeds only a user's stop slice, a limit or an empty
    answer may leave a slice empty: the walks' ends walk on with the stop policy off."""
    truth = shifted_column()
    fake = tissue_change_between(truth, (9, 10, 11))
    old = run_to_completion(propagate(fake, seeds(fake, 4, 16), stop=INTENSITY, gap_fill="none"))
    assert filled(old, 4, 16) == [4, 5, 6, 7, 8, 12, 13, 14, 15, 16]  # the hole the issue saw
    result = run_to_completion(propagate(fake, seeds(fake, 4, 16), stop=INTENSITY))
    assert filled(result, 4, 16) == list(range(4, 17))
    np.testing.assert_array_equal(result.mask_zyx(truth.shape)[4:17], truth[4:17])
    assert "intensity unlike the seed's at slice 9" in result.stopped["up from 4"]
    assert "3 of the 3 slices left between the seeds walked on" in result.stopped["up from 4"]
    assert all(result.confidence[z] < 0.5 for z in (9, 10, 11))  # filled, and flagged for review
    boxed = run_to_completion(propagate(fake, seeds(fake, 4, 16), stop=INTENSITY, gap_fill="box"))
    assert filled(boxed, 4, 16) == list(range(4, 17))
    # Outside the seeds a walk that stops early still ends the object.
    alone = run_to_completion(propagate(fake, seed(fake, 4), direction="up", stop=INTENSITY))
    assert max(alone.slices) == 8


def test_a_user_stop_slice_in_the_hole_stays_empty():
    fake = tissue_change_between(shifted_column(), (9, 10, 11))
    rules = dataclasses.replace(INTENSITY, stop_slices=frozenset({10}))
    result = run_to_completion(propagate(fake, seeds(fake, 4, 16), stop=rules))
    assert filled(result, 4, 16) == [4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16]


# ------------------------------------------------------------------------------ stop signals
class TunableFake(FakePredictor):
    """FakePredictor with a chosen predicted IoU per slice and soft logits (for stability)."""

    def __init__(self, truth, iou_by_z=None, soft_from=None):
        super().__init__(truth)
        self.iou_by_z = iou_by_z or {}
        self.soft_from = soft_from

    def predict(self, z, **kwargs):
        pred = super().predict(z, **kwargs)
        logits = pred.logits_256
        if self.soft_from is not None and z >= self.soft_from:
            logits = np.where(logits > 0, 0.5, -0.5).astype(np.float32)  # every pixel near the threshold
        return dataclasses.replace(pred, iou=self.iou_by_z.get(z, pred.iou), logits_256=logits)


def test_stability_score_is_one_for_confident_logits_and_low_for_soft_ones():
    sharp = np.where(np.arange(256)[None, :] < 100, 8.0, -8.0) * np.ones((256, 1))
    assert stability_score(sharp) == 1.0
    soft = np.linspace(-3, 3, 256)[None, :] * np.ones((256, 1))  # a wide ramp around 0
    assert 0.4 < stability_score(soft) < 0.8
    assert stability_score(np.full((256, 256), -5.0)) == 0.0


def test_signals_against_previous_seed_and_intensity():
    volume = np.full((3, 20, 20), 50, np.uint8)
    volume[0, 5:15, 5:15] = 100
    volume[1, 5:15, 5:15] = 100
    volume[2, 5:15, 5:15] = 200  # the walk has entered another tissue
    volume[0:2, 5:15, 5:10] += 10  # some texture, so the seed's std is not 0
    m = np.zeros((20, 20), bool)
    m[5:15, 5:15] = True
    half = m.copy()
    half[:, 10:] = False
    logits = np.where(np.resize(m, (256, 256)), 6.0, -6.0).astype(np.float32)
    s0 = SlicePrediction(0, m, logits, 0.95)
    s1 = SlicePrediction(1, half, logits, 0.8)
    s2 = SlicePrediction(2, m, logits, 0.9)
    stats = (float(volume[0][m].mean()), float(volume[0][m].std()))
    sig = slice_signals(s1, s0, s0, stats, volume[1])
    assert sig.area == 50 and sig.area_ratio_previous == pytest.approx(0.5) and sig.area_ratio_seed == pytest.approx(0.5)
    assert sig.iou_previous == pytest.approx(0.5) and sig.predicted_iou == pytest.approx(0.8)
    assert sig.distance == 1 and sig.stability == 1.0
    assert sig.intensity_shift == pytest.approx(1.0)  # half the seed's mask: +5 over a std of 5
    far = slice_signals(s2, s1, s0, stats, volume[2])
    assert far.intensity_shift > 15 and far.area_ratio_previous == pytest.approx(2.0)
    # Without a volume the intensity signals are absent, and no rule reads them.
    bare = slice_signals(s2, s1)
    assert bare.intensity_shift is None and StopPolicy(max_intensity_shift=0.1).rejects(bare) is None


def walk_up(fake, policy, z0=10):
    return run_to_completion(propagate(fake, seed(fake, z0), direction="up", stop=StopRules(policy=policy)))


def test_each_signal_can_end_a_walk():
    truth = ellipsoid_zyx()
    # Predicted IoU: the model doubts slice 13.
    fake = TunableFake(truth, iou_by_z={13: 0.4})
    assert max(walk_up(fake, StopPolicy.off()).slices) == 16
    result = walk_up(fake, StopPolicy(min_iou_previous=None, min_predicted_iou=0.5))
    assert max(result.slices) == 12 and "low predicted IoU at slice 13" in result.stopped["up from 10"]
    assert result.stop_signals["up from 10"].predicted_iou == pytest.approx(0.4)
    # Stability: soft logits from slice 14.
    fake = TunableFake(truth, soft_from=14)
    result = walk_up(fake, StopPolicy(min_iou_previous=None, min_stability=0.5))
    assert max(result.slices) == 13 and "unstable mask" in result.stopped["up from 10"]
    # Intensity: the object's voxels turn to another tissue from slice 14.
    fake = FakePredictor(truth)
    fake.volume = np.where(truth, 120, 30).astype(np.uint8)
    fake.volume[truth & (np.arange(truth.shape[1])[None, :, None] % 2 == 0)] = 130  # texture: seed std 5
    fake.volume[14:][truth[14:]] = 250
    result = walk_up(fake, StopPolicy(min_iou_previous=None, max_intensity_shift=4.0))
    assert max(result.slices) == 13 and "intensity unlike the seed's at slice 14" in result.stopped["up from 10"]
    # Area: shrinking below a fraction of the seed (the ellipsoid's tips).
    fake = FakePredictor(truth)
    result = walk_up(fake, StopPolicy(min_iou_previous=None, min_area_ratio_seed=0.5))
    areas = truth.sum(axis=(1, 2))
    assert max(result.slices) == max(z for z in range(10, 17) if areas[z] >= 0.5 * areas[10])


def test_a_bloom_into_the_neighbour_stops_on_growth():
    truth = ellipsoid_zyx()
    bloomed = truth.copy()
    bloomed[13, 2:38, 2:46] = True  # slice 13 leaks over the whole field
    fake = FakePredictor(bloomed)
    result = run_to_completion(propagate(fake, seed(fake, 10), direction="up",
                                         stop=StopRules(policy=StopPolicy(min_iou_previous=None, max_area_growth=1.5))))
    assert max(result.slices) == 12 and "mask grew too fast" in result.stopped["up from 10"]


def test_stop_rules_keep_their_old_fields_and_fold_them_into_the_policy():
    assert StopRules().policy_in_force == DEFAULT_POLICY
    assert StopRules().min_iou_with_previous == FROM_POLICY
    legacy = StopRules(min_iou_with_previous=0.5, policy=LEGACY_POLICY)
    assert legacy.policy_in_force == StopPolicy()
    explicit = StopRules(min_iou_with_previous=None, min_predicted_iou=0.7)
    assert explicit.policy_in_force.min_iou_previous is None and explicit.policy_in_force.min_predicted_iou == 0.7
    assert explicit.policy_in_force.max_intensity_shift == DEFAULT_POLICY.max_intensity_shift
    # dataclasses.replace (the session adds stop slices that way) keeps the choice.
    again = dataclasses.replace(explicit, stop_slices=frozenset({3}))
    assert again.policy_in_force == explicit.policy_in_force
    # rejects() still works with just the two predictions (no signals passed).
    m = np.zeros((10, 10), bool)
    m[2:8, 2:8] = True
    moved = np.roll(m, 5, axis=1)
    logits = np.zeros((256, 256), np.float32)
    assert StopRules().rejects(SlicePrediction(1, moved, logits, 0.9), SlicePrediction(0, m, logits, 0.9)) == \
        "low overlap with previous slice"


def test_the_default_policy_is_the_tuned_one_and_differs_from_the_legacy_rule():
    assert DEFAULT_POLICY != LEGACY_POLICY
    assert DEFAULT_POLICY.min_iou_previous is not None  # the jump guard stays on


# ------------------------------------------------------------------------------ confidence
def signals(**changes):
    base = dict(z=1, distance=1, area=100, predicted_iou=0.93, iou_previous=0.9, area_ratio_previous=1.0,
                area_ratio_seed=1.0, stability=0.95, intensity_shift=0.2, std_ratio=1.0)
    return SliceSignals(**{**base, **changes})


def test_confidence_is_high_mid_object_and_falls_with_each_bad_signal():
    good = slice_confidence(signals())
    assert 0.8 < good <= 1.0
    for bad in (dict(predicted_iou=0.65), dict(iou_previous=0.4), dict(stability=0.3), dict(intensity_shift=2.5)):
        assert slice_confidence(signals(**bad)) < good - 0.2, bad
    assert slice_confidence(signals(area=0)) == 0.0
    assert slice_confidence(signals(intensity_shift=None)) == pytest.approx(slice_confidence(signals(intensity_shift=0.0)))


def test_the_result_carries_confidence_and_signals_for_every_slice():
    fake = TunableFake(ellipsoid_zyx(), iou_by_z={12: 0.7})
    result = run_to_completion(propagate(fake, seed(fake, 10), stop=OFF))
    assert set(result.confidence) == set(result.predictions)
    assert result.confidence[10] == 1.0 and 10 not in result.signals
    assert set(result.signals) == set(result.predictions) - {10}
    assert all(0.0 <= c <= 1.0 for c in result.confidence.values())
    assert result.confidence[12] < result.confidence[11]


def test_session_confidence_follows_the_labels():
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import Volume

    truth = ellipsoid_zyx(shape=(20, 40, 48))
    session = SegmentationSession(Volume(np.zeros(truth.shape[::-1], np.float32), np.eye(4)), window="abdomen")
    session._predictor = TunableFake(truth, iou_by_z={13: 0.75})
    session.stop_rules = OFF
    obj = session.add_object("blob")
    session.segment_slice(obj.label_id, 10, box_xyxy=bounding_box_xyxy(truth[10]))
    run_to_completion(session.propagate(obj.label_id))
    conf = session.confidence[obj.label_id]
    assert sorted(conf) == sorted(np.flatnonzero(truth.any(axis=(1, 2))))
    assert conf[10] == 1.0 and conf[13] < conf[12]
    assert session.signals[obj.label_id][13].predicted_iou == pytest.approx(0.75)
    assert "up from 10" in session.stopped[obj.label_id]
    session.stop_here(obj.label_id, 14)  # the object now ends at 13: 14.. have no confidence
    assert max(session.confidence[obj.label_id]) == 13
    session.segment_slice(obj.label_id, 13, box_xyxy=bounding_box_xyxy(truth[13]))  # a user seed is sure
    assert session.confidence[obj.label_id][13] == 1.0


# ------------------------------------------------------------------------------ real weights
@pytest.mark.model
@pytest.mark.slow
def test_spleen_span_ends_within_one_slice_with_the_default_policy(sample_dir, lite_medsam, embedding_cache_dir):
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import read_labels, read_volume

    volume = read_volume(sample_dir / "ct_spleen_msd_spleen2_crop" / "image.nii.gz")
    session = SegmentationSession(volume, loaded_model=lite_medsam, cache_dir=embedding_cache_dir)
    spleen = session.view.to_view(read_labels(sample_dir / "ct_spleen_msd_spleen2_crop" / "label.nii.gz", volume)) == 1
    z = int(np.argmax(spleen.sum(axis=(1, 2))))
    obj = session.add_object("spleen")
    session.segment_slice(obj.label_id, z, box_xyxy=bounding_box_xyxy(spleen[z]))
    run_to_completion(session.propagate(obj.label_id))
    span = span_report(session.labels.array == obj.label_id, spleen)
    # The legacy rule walked 0-25 (truth 3-22): three slices into the lung at the top end.
    assert span["ends_within_1"], format_span(span)
    conf = session.confidence[obj.label_id]
    assert conf[z] == 1.0 and min(conf.values()) < 0.9 < max(v for k, v in conf.items() if k != z)


def test_a_click_seed_smaller_than_its_object_does_not_stop_the_walk_by_growth():
    """One click often segments only the object's core; the slice after it grows, legitimately."""
    truth = np.zeros((9, 40, 40), bool)
    truth[1:8, 8:32, 8:32] = True
    predictor = FakePredictor(truth)
    core = np.zeros((40, 40), bool)
    core[16:24, 16:24] = True  # the click's answer: 64 of 576 px
    growth = StopRules(policy=StopPolicy(min_iou_previous=None, max_area_growth=1.2))
    clicked = SlicePrediction(z=4, mask_yx=core, logits_256=np.zeros((256, 256), np.float32), iou=0.9,
                              prompt={"box_xyxy": None, "points_yx": np.array([[20.0, 20.0]]), "mask": False})
    result = run_to_completion(propagate(predictor, {4: clicked}, mode="mask", stop=growth))
    assert filled(result, 1, 7) == [1, 2, 3, 4, 5, 6, 7]
    boxed = dataclasses.replace(clicked, prompt={"box_xyxy": np.array([16.0, 16, 23, 23]), "points_yx": None})
    predictor.calls.clear()
    result = run_to_completion(propagate(predictor, {4: boxed}, mode="mask", stop=growth))
    assert filled(result, 1, 7) == [4]  # a boxed seed that small did bloom: growth still stops it


def test_a_walk_from_a_click_seed_may_keep_growing_for_several_slices():
    """Past a click seed an object can widen over several slices (a cone here, 1.5x per slice):
    the walk from clicks follows it; from a box that small, growth stops it at once."""
    truth = np.zeros((9, 48, 48), bool)
    for z, half in zip(range(4, 9), (3, 4, 5, 6, 7)):
        truth[z, 24 - half:24 + half, 24 - half:24 + half] = True
    predictor = FakePredictor(truth)
    growth = StopRules(policy=StopPolicy(min_iou_previous=None, max_area_growth=1.2))
    clicked = SlicePrediction(z=4, mask_yx=truth[4].copy(), logits_256=np.zeros((256, 256), np.float32), iou=0.9,
                              prompt={"box_xyxy": None, "points_yx": np.array([[24.0, 24.0]]), "mask": False})
    result = run_to_completion(propagate(predictor, {4: clicked}, mode="mask", direction="up", stop=growth))
    assert filled(result, 4, 8) == [4, 5, 6, 7, 8]
    boxed = dataclasses.replace(clicked, prompt={"box_xyxy": np.array([21.0, 21, 26, 26]), "points_yx": None})
    result = run_to_completion(propagate(predictor, {4: boxed}, mode="mask", direction="up", stop=growth))
    assert filled(result, 4, 8) == [4]
    assert (5, ("box",)) not in predictor.calls  # mask-only mode is never given a box


def test_a_box_and_mask_walk_retries_a_rejected_slice_with_the_box_before_it_stops():
    """The dense prompt carries drift; the propagation box alone re-anchors on the image. The walk
    stops only where the box's answer fails the policy too."""
    truth = ellipsoid_zyx()
    drifted = truth.copy()
    drifted[13:, 2:38, 2:46] = True  # from slice 13 the true mask fills the field...

    class DriftOnMask(FakePredictor):
        def predict(self, z, **kw):  # ...but only a mask-prompted answer drifts into it
            out = super().predict(z, **kw)
            if kw.get("mask_logits_256") is not None and z >= 13:
                out = dataclasses.replace(out, mask_yx=drifted[z].copy())
            return out

    growth = StopRules(policy=StopPolicy(min_iou_previous=None, max_area_growth=1.5))
    fake = DriftOnMask(truth)
    result = run_to_completion(propagate(fake, seed(fake, 10), mode="box+mask", direction="up", stop=growth))
    assert max(result.slices) == 16  # the box retries carried the walk to the object's end
    assert all(np.array_equal(result.predictions[z].mask_yx, truth[z]) for z in result.predictions)
    # In box mode there is no dense prompt to blame: nothing is retried.
    fake = DriftOnMask(truth)
    result = run_to_completion(propagate(fake, seed(fake, 10), mode="box", direction="up", stop=growth))
    assert max(result.slices) == 16 and all(kinds == ("box",) for _, kinds in fake.calls[1:])
