"""Choose the propagation stop policy by measurement, with leave-one-case-out.

Protocol (the box protocol of compare_modes.py): on each shared case and label, the ground-truth
box on the slice where the label is largest, then box propagation up and down. Each walk is
recorded ONCE with no stop rule (it runs until the mask empties or the volume ends), keeping per
slice the `SliceSignals` and the overlap with the truth. A stop rule only truncates a walk (in box
mode a slice's prompt depends only on the slices before it), so replaying any `StopPolicy` on the
recorded sequences gives exactly what a propagation with that policy would have returned.
In box+mask mode the engine retries a slice the policy rejects with the box alone
(`engine.propagation.FALLBACK_MODE`) and walks on from that answer when it passes; the replay
does not model that retry, so for those modes it is exact only up to the first rejected slice.

The search: a grid over the thresholds of `engine.propagation.StopPolicy`. A policy is scored on
a set of objects by mean 3D Dice + 0.05 x the fraction of objects whose both ends are within one
slice of the truth, among the policies that leave no object of that set more than 0.02 Dice
below today's rule (overlap with the previous slice >= 0.5); ties go to the policy with fewer
tests. Leave-one-case-out: for each case, choose on the other cases, score on it; the held-out
figures are what the policy can be expected to do on a new scan.

    python benchmarks/tune_stop.py [--model lite_medsam] [--mode box] [--record /tmp/stop_record.pkl]
                                   [--gap-check] [--json out.json]

`--record` keeps the recorded walks: a second run with the same file skips the model entirely
(delete it, or pass another path, after changing the model or the signals).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_modes import DEFAULT_LABELS, SHARED  # noqa: E402

# The thresholds searched, per StopPolicy field (None = test off). Kept coarse on purpose: ten
# objects cannot support a fine grid.
GRID = {
    # Always on: it is the one guard against a jump to another structure in the mask and point
    # modes, which this box-protocol measurement does not exercise. (Off, it won here only on
    # BraTS 2013 pat0002 label 4, by walking 29 slices that miss the lesion and finding it again.)
    "min_iou_previous": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "min_predicted_iou": [None, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9],
    "min_stability": [None, 0.5, 0.6, 0.7, 0.8, 0.9],
    "max_intensity_shift": [None, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
    "max_area_growth": [None, 1.2, 1.5, 2.0],
    "min_area_ratio_seed": [None, 0.02, 0.05, 0.1, 0.2],
}
SPAN_WEIGHT = 0.05
MAX_LOSS = 0.02


# ------------------------------------------------------------------------------------ recording
def lesion_cases() -> dict[str, dict]:
    """The lesion validation cases (benchmarks/lesions.py: the sarcoma validation patients and the
    stroke case): case id -> {image, label, group (the patient: leave-one-out leaves a patient out,
    since a patient's CT and MR show one tumour)}."""
    from lesions import case_sets

    out = {}
    for c in case_sets(["sarcoma", "stroke"]):
        patient = c["case"].rsplit("_", 1)[0]
        out[c["case"]] = {"image": c["image"], "label": c["label"], "labels": [1], "group": patient}
    return out


def shared_cases(cases: list[str]) -> dict[str, dict]:
    return {c: {"image": SHARED / c / "image.nii.gz", "label": SHARED / c / "label.nii.gz",
                "labels": DEFAULT_LABELS[c], "group": c} for c in cases}


def record(model: str, cases: dict[str, dict], cache_dir: str, mode: str | None = None) -> list[dict]:
    """Walk every object with no stop rule; one dict per object (see the module docstring)."""
    import torch

    from medsam_plugin.engine.propagation import StopPolicy, StopRules, bounding_box_xyxy, run_to_completion
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import read_labels, read_volume
    from medsam_plugin.model.registry import load_model

    torch.set_num_threads(1)
    loaded = load_model(model)
    objects = []
    for case, where in cases.items():
        volume = read_volume(where["image"])
        truth_ijk = read_labels(where["label"], volume)
        for label in where["labels"]:
            start = time.perf_counter()
            session = SegmentationSession(volume, loaded_model=loaded, cache_dir=cache_dir)
            if mode is not None:
                session.mode = mode  # else the model's own default mode
            truth = session.view.to_view(truth_ijk) == label
            areas = truth.sum(axis=(1, 2))
            z0 = int(np.argmax(areas))
            obj = session.add_object(label_id=label)
            seed = session.segment_slice(obj.label_id, z0, box_xyxy=bounding_box_xyxy(truth[z0]))
            result = run_to_completion(session.propagate(obj.label_id, stop=StopRules(policy=StopPolicy.off())))
            walks = {}
            for name, step in (("down", -1), ("up", 1)):
                zs = []
                z = z0 + step
                while z in result.predictions:
                    zs.append(z)
                    z += step
                walks[name] = {
                    "z": zs,
                    "signals": [result.signals[z].as_dict() for z in zs],
                    "inter": [int((result.predictions[z].mask_yx & truth[z]).sum()) for z in zs],
                    "area": [int(result.predictions[z].mask_yx.sum()) for z in zs],
                    "truth_area": [int(areas[z]) for z in zs],
                }
            objects.append({"case": case, "group": where["group"], "label": int(label), "mode": session.mode, "seed_z": z0, "n_slices": int(truth.shape[0]),
                            "seed_inter": int((seed.mask_yx & truth[z0]).sum()), "seed_area": int(seed.mask_yx.sum()),
                            "truth_total": int(areas.sum()), "truth_areas": [int(a) for a in areas],
                            "walks": walks, "stopped": dict(result.stopped)})
            print(f"recorded {case} {label} ({session.mode} mode): seed {z0}, walked {len(walks['down']['z'])} down / "
                  f"{len(walks['up']['z'])} up ({time.perf_counter() - start:.0f} s)", flush=True)
    return objects


# ------------------------------------------------------------------------------------ replay
def _signal_array(walk: dict, key: str) -> np.ndarray:
    return np.array([np.nan if s[key] is None else s[key] for s in walk["signals"]], dtype=float)


def first_failures(walk: dict) -> dict[str, np.ndarray]:
    """Per grid field: for each threshold, the index of the first slice that fails it (len if none).

    Mirrors `StopPolicy.rejects`: a None signal (no intensity) never fails.
    """
    k = len(walk["z"])
    tests = {
        "min_iou_previous": (_signal_array(walk, "iou_previous"), np.less),
        "min_predicted_iou": (_signal_array(walk, "predicted_iou"), np.less),
        "min_stability": (_signal_array(walk, "stability"), np.less),
        "max_intensity_shift": (_signal_array(walk, "intensity_shift"), np.greater),
        "max_area_growth": (_signal_array(walk, "area_ratio_previous"), np.greater),
        "min_area_ratio_seed": (_signal_array(walk, "area_ratio_seed"), np.less),
    }
    out = {}
    for field, (values, fails) in tests.items():
        firsts = []
        for threshold in GRID[field]:
            if threshold is None or k == 0:
                firsts.append(k)
                continue
            bad = np.flatnonzero(fails(values, threshold))  # NaN compares False: never fails
            firsts.append(int(bad[0]) if bad.size else k)
        out[field] = np.array(firsts)
    return out


def kept_lengths(objects: list[dict]) -> np.ndarray:
    """(n_policies, n_objects, 2) slices kept below / above the seed, for every grid policy."""
    fields = list(GRID)
    per_walk = []
    for obj in objects:
        for name in ("down", "up"):
            per_walk.append(first_failures(obj["walks"][name]))
    # Broadcast every field's thresholds against the others: a policy keeps slices up to the
    # first failure of any of its tests.
    shape = [len(GRID[f]) for f in fields]
    lengths = np.empty((int(np.prod(shape)), len(per_walk)), dtype=np.int32)
    for w, firsts in enumerate(per_walk):
        grids = np.meshgrid(*[firsts[f] for f in fields], indexing="ij")
        lengths[:, w] = np.minimum.reduce([g.ravel() for g in grids])
    return lengths.reshape(-1, len(objects), 2)


def all_policies() -> list[dict]:
    fields = list(GRID)
    return [dict(zip(fields, values)) for values in itertools.product(*[GRID[f] for f in fields])]


def scores(objects: list[dict], kept: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dice (n_policies, n_objects), low/high end errors (positive = overshoot) and within-1 flags."""
    n_pol = kept.shape[0]
    dice = np.empty((n_pol, len(objects)))
    low_err = np.empty((n_pol, len(objects)), dtype=int)
    high_err = np.empty_like(low_err)
    for i, obj in enumerate(objects):
        cum = {}
        for name in ("down", "up"):
            w = obj["walks"][name]
            cum[name] = (np.concatenate([[0], np.cumsum(w["inter"])]), np.concatenate([[0], np.cumsum(w["area"])]))
        kd, ku = kept[:, i, 0], kept[:, i, 1]
        inter = obj["seed_inter"] + cum["down"][0][kd] + cum["up"][0][ku]
        area = obj["seed_area"] + cum["down"][1][kd] + cum["up"][1][ku]
        dice[:, i] = 2.0 * inter / (area + obj["truth_total"])
        present = np.flatnonzero(obj["truth_areas"])
        # Kept masks are never empty, so the prediction spans [seed - kd, seed + ku].
        low_err[:, i] = present[0] - (obj["seed_z"] - kd)
        high_err[:, i] = (obj["seed_z"] + ku) - present[-1]
    within = (np.abs(low_err) <= 1) & (np.abs(high_err) <= 1)
    return dice, low_err, high_err, within


def choose(dice: np.ndarray, within: np.ndarray, legacy: int, idx: np.ndarray, complexity: np.ndarray) -> int:
    """The best policy on objects `idx` (see the module docstring for the objective)."""
    d, w = dice[:, idx], within[:, idx]
    allowed = (d >= dice[legacy, idx] - MAX_LOSS).all(axis=1)
    objective = d.mean(axis=1) + SPAN_WEIGHT * w.mean(axis=1)
    objective = np.where(allowed, objective, -np.inf)
    best = objective.max()
    ties = np.flatnonzero(objective >= best - 1e-12)
    return int(ties[np.argmin(complexity[ties])])


def confidence_auc(objects: list[dict], kept_row: np.ndarray) -> tuple[float, int, int]:
    """How well slice_confidence ranks wrong slices below right ones, over the slices a policy keeps.

    A slice is 'wrong' when its 2D Dice with the truth is under 0.5 (including slices past the
    object's end). Returns (AUC, n wrong, n right); AUC 0.5 = no better than chance.
    """
    from medsam_plugin.engine.propagation import SliceSignals, slice_confidence

    conf, bad = [], []
    for i, obj in enumerate(objects):
        for j, name in enumerate(("down", "up")):
            w = obj["walks"][name]
            for k in range(int(kept_row[i, j])):
                conf.append(slice_confidence(SliceSignals(**w["signals"][k])))
                bad.append(2 * w["inter"][k] / (w["area"][k] + w["truth_area"][k]) < 0.5)
    conf, bad = np.array(conf), np.array(bad)
    if bad.all() or not bad.any():
        return float("nan"), int(bad.sum()), int((~bad).sum())
    good_c, bad_c = conf[~bad], conf[bad]
    # Mann-Whitney: P(confidence of a right slice > that of a wrong one), ties count half.
    greater = (good_c[:, None] > bad_c[None, :]).mean() + 0.5 * (good_c[:, None] == bad_c[None, :]).mean()
    return float(greater), int(bad.sum()), int((~bad).sum())


def gap_check(model: str, cache_dir: str, case: str = "mr_brain_edema_brats2021_01646", label: int = 1) -> list[dict]:
    """The issue's gap target: three GT-box seeds (the largest slice, and a quarter and three quarters
    into the truth's extent, plus the seeds the issue reported: 42, 67, 82); which slices between
    the outer seeds stay empty, with the legacy and the default stop policy."""
    import torch

    from medsam_plugin.engine.propagation import (DEFAULT_POLICY, LEGACY_POLICY, StopRules, bounding_box_xyxy,
                                                  run_to_completion)
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.evaluation.metrics import dice
    from medsam_plugin.io import read_labels, read_volume
    from medsam_plugin.model.registry import load_model

    torch.set_num_threads(1)
    loaded = load_model(model)
    volume = read_volume(SHARED / case / "image.nii.gz")
    truth_ijk = read_labels(SHARED / case / "label.nii.gz", volume)
    out = []
    for which, (policy_name, policy) in itertools.product(("quartiles", "issue"),
                                                         (("legacy", LEGACY_POLICY), ("default", DEFAULT_POLICY))):
        session = SegmentationSession(volume, loaded_model=loaded, cache_dir=cache_dir)
        truth = session.view.to_view(truth_ijk) == label
        areas = truth.sum(axis=(1, 2))
        present = np.flatnonzero(areas)
        lo, hi = int(present[0]), int(present[-1])
        zs = ([lo + (hi - lo) // 4, int(np.argmax(areas)), lo + 3 * (hi - lo) // 4] if which == "quartiles"
              else [42, 67, 82])
        obj = session.add_object(label_id=label)
        for z in zs:
            session.segment_slice(obj.label_id, z, box_xyxy=bounding_box_xyxy(truth[z]))
        result = run_to_completion(session.propagate(obj.label_id, stop=StopRules(policy=policy)))
        pred = session.labels.array == obj.label_id
        empty = [z for z in range(min(zs), max(zs) + 1) if not pred[z].any()]
        out.append({"policy": policy_name, "seeds": zs, "empty_between_seeds": empty, "dice": float(dice(pred, truth)),
                    "stopped": dict(result.stopped)})
        print(f"  {policy_name:8s}{case} seeds {zs}: empty slices between them {empty or 'none'}, Dice {out[-1]['dice']:.3f}")
        for name, why in result.stopped.items():
            print(f"    {name}: {why}")
    return out


def describe(policy: dict) -> str:
    on = {k: v for k, v in policy.items() if v is not None}
    return ", ".join(f"{k}={v}" for k, v in on.items()) or "no test"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite_medsam", help="registry name or checkpoint path")
    parser.add_argument("--mode", default=None, help="propagation prompt mode (default: the model's own default)")
    parser.add_argument("--cases", default=None, help="comma-separated case ids (default: compare_modes.DEFAULT_LABELS)")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "medsam_plugin_bench_cache"))
    parser.add_argument("--record", default=None, help="pickle of the recorded walks: read if present, else written")
    parser.add_argument("--json", default=None, help="write the per-object figures here")
    parser.add_argument("--lesions", action="store_true",
                        help="the lesion validation patients and the stroke case (benchmarks/lesions.py) beside "
                             "the shared cases; leave-one-patient-out")
    parser.add_argument("--gap-check", action="store_true", help="also run the three-seed gap check on BraTS 2021 "
                        "(loads the model)")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (the team's shared labelled volumes).")
        return 0
    if args.lesions:  # the lesions and the shared cases: one rule must serve both
        case_info = {**lesion_cases(), **shared_cases(args.cases.split(",") if args.cases else list(DEFAULT_LABELS))}
    else:
        case_info = shared_cases(args.cases.split(",") if args.cases else list(DEFAULT_LABELS))
    cases = list(case_info)
    record_path = Path(args.record) if args.record else None
    if record_path is not None and record_path.is_file():
        saved = pickle.loads(record_path.read_bytes())
        if saved["model"] != args.model or saved.get("mode") != args.mode:
            raise SystemExit(f"{record_path} holds walks of model {saved['model']!r} (mode {saved.get('mode')}), "
                             f"not {args.model!r} (mode {args.mode}): pass another --record path.")
        objects = [o for o in saved["objects"] if o["case"] in cases]
        print(f"replaying {len(objects)} recorded objects from {record_path}")
    else:
        objects = record(args.model, case_info, args.cache_dir, args.mode)
        if record_path is not None:
            record_path.write_bytes(pickle.dumps({"model": args.model, "mode": args.mode, "objects": objects}))

    policies = all_policies()
    legacy = policies.index({**{f: None for f in GRID}, "min_iou_previous": 0.5})
    complexity = np.array([sum(v is not None for v in p.values()) for p in policies])
    kept = kept_lengths(objects)
    dice, low_err, high_err, within = scores(objects, kept)
    case_of = np.array([o.get("group", o["case"]) for o in objects])

    # Leave one case (one patient, for lesions) out: choose on the others, score the held-out objects.
    held = np.empty(len(objects), dtype=int)
    print("\nleave-one-out choices (one case, or one patient for --lesions)")
    for case in dict.fromkeys(case_of):
        train, test = np.flatnonzero(case_of != case), np.flatnonzero(case_of == case)
        best = choose(dice, within, legacy, train, complexity)
        held[test] = best
        print(f"  without {case:40s} -> {describe(policies[best])}")
    final = choose(dice, within, legacy, np.arange(len(objects)), complexity)

    rows = []
    header = (f"{'case':40s} {'lab':>3s} {'truth':>7s} | {'today: span':>13s} {'ends':>7s} {'dice':>6s} | "
              f"{'held-out: span':>14s} {'ends':>7s} {'dice':>6s} | {'chosen: span':>13s} {'ends':>7s} {'dice':>6s}")
    print("\n" + header)
    for i, obj in enumerate(objects):
        present = np.flatnonzero(obj["truth_areas"])
        row = {"case": obj["case"], "label": obj["label"], "truth_range": [int(present[0]), int(present[-1])]}
        cells = []
        for tag, p in (("today", legacy), ("held_out", held[i]), ("chosen", final)):
            lo, hi = obj["seed_z"] - int(kept[p, i, 0]), obj["seed_z"] + int(kept[p, i, 1])
            row[tag] = {"pred_range": [lo, hi], "overshoot_low": int(low_err[p, i]), "overshoot_high": int(high_err[p, i]),
                        "ends_within_1": bool(within[p, i]), "dice": float(dice[p, i]), "policy": policies[p]}
            cells.append(f"{lo:>6d}-{hi:<6d} {low_err[p, i]:+3d}/{high_err[p, i]:+3d} {dice[p, i]:6.3f}")
        rows.append(row)
        print(f"{obj['case']:40s} {obj['label']:3d} {present[0]:>3d}-{present[-1]:<3d} | " + " | ".join(cells))
    n = len(objects)
    held_dice = np.array([dice[held[i], i] for i in range(n)])
    held_within = np.array([within[held[i], i] for i in range(n)])
    summary = {
        "objects": n,
        "today": {"mean_dice": float(dice[legacy].mean()), "within_1": int(within[legacy].sum())},
        "held_out": {"mean_dice": float(held_dice.mean()), "within_1": int(held_within.sum()),
                     "worst_loss_vs_today": float((dice[legacy] - held_dice).max())},
        "chosen": {"policy": policies[final], "mean_dice": float(dice[final].mean()), "within_1": int(within[final].sum()),
                   "worst_loss_vs_today": float((dice[legacy] - dice[final]).max())},
    }
    auc = {tag: confidence_auc(objects, kept[p]) for tag, p in (("today", legacy), ("chosen", final))}
    summary["confidence_auc"] = {tag: {"auc": a, "wrong_slices": b, "right_slices": g} for tag, (a, b, g) in auc.items()}
    print(f"\nmean Dice over {n} objects; 'ends' = both ends within 1 slice of the truth")
    print(f"  today (min_iou_previous=0.5)  dice {summary['today']['mean_dice']:.3f}  ends {summary['today']['within_1']}/{n}")
    print(f"  held-out (leave one case out) dice {summary['held_out']['mean_dice']:.3f}  ends {summary['held_out']['within_1']}/{n}"
          f"  worst loss vs today {summary['held_out']['worst_loss_vs_today']:+.3f}")
    print(f"  chosen on all cases           dice {summary['chosen']['mean_dice']:.3f}  ends {summary['chosen']['within_1']}/{n}"
          f"  worst loss vs today {summary['chosen']['worst_loss_vs_today']:+.3f}  ({describe(policies[final])})")
    for tag, (a, b, g) in auc.items():
        print(f"  slice_confidence AUC (right vs wrong slices kept by {tag}): {a:.3f} ({b} wrong, {g} right)")
    gaps = None
    if args.gap_check:
        print("\nthree seeds on one object:")
        gaps = gap_check(args.model, args.cache_dir)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "mode": args.mode, "summary": summary, "objects": rows,
                                               "gap_check": gaps}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
