"""Which propagation prompt mode works best? One-box simulated expert on every shared case.

For each case and label: the ground-truth box on the slice where the label is largest, then
propagation in each mode; Dice against the ground truth. Embeddings are computed once per case
(on-disk cache) and shared by all modes, so the comparison costs one encode per slice.

    python benchmarks/compare_modes.py [--modes box,mask,...] [--policy default,legacy] [--model lite_medsam] [--json out.json]

Per object it prints the predicted and true slice ranges and the end errors (positive: the walk
ran past the truth's end; negative: it stopped short), and per rule how many objects end within
one slice of the truth at both ends.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

# The labels FACTS.md measured, plus every BraTS tumour sub-region.
DEFAULT_LABELS = {
    "ct_spleen_msd_spleen2_crop": [1],
    "ct_abdomen_totalseg_sm": [5],
    "mr_abdomen_totalseg_sm": [5],
    "mr_spinalcord_ivadomed_t2w": [1],
    "mr_brain_edema_brats2021_01646": [1],
    "mr_brain_tumour_brats_2013_pat0001_1": [1, 2, 4],
    "mr_brain_tumour_brats_2013_pat0002_1": [2, 4],
}


def main(argv=None) -> int:
    from medsam_plugin.engine.propagation import DEFAULT_POLICY, FROM_POLICY, LEGACY_POLICY, PROMPT_MODES, StopPolicy, StopRules
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.evaluation.simulate import simulate_object
    from medsam_plugin.evaluation.span import format_span, span_report
    from medsam_plugin.io import read_labels, read_volume
    from medsam_plugin.model.registry import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(PROMPT_MODES))
    parser.add_argument("--policy", default="default",
                        help="comma-separated stop policies: default (engine's DEFAULT_POLICY), legacy (IoU with the "
                             "previous slice >= 0.5 only, the rule before issue 10), off")
    parser.add_argument("--min-iou", default="policy", help="comma-separated overlap thresholds to compare "
                        "('policy': the policy's own)")
    parser.add_argument("--min-pred-iou", default="policy", help="comma-separated predicted-IoU floors to compare")
    parser.add_argument("--candidates", default="single", help="comma-separated candidate rules to compare")
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--cases", default=None, help="comma-separated case ids (default: all with labels above)")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "medsam_plugin_bench_cache"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (the team's shared labelled volumes).")
        return 0
    modes = args.modes.split(",")
    def value(t):
        return None if t in ("none", "") else FROM_POLICY if t == FROM_POLICY else float(t)

    policies = {"default": DEFAULT_POLICY, "legacy": LEGACY_POLICY, "off": StopPolicy.off()}
    thresholds = [value(t) for t in args.min_iou.split(",")]
    floors = [value(t) for t in args.min_pred_iou.split(",")]
    rules = [(pol, thr, floor, cand) for pol in args.policy.split(",") for thr in thresholds for floor in floors
             for cand in args.candidates.split(",")]
    cases = args.cases.split(",") if args.cases else list(DEFAULT_LABELS)
    loaded = load_model(args.model)
    rows = []
    for case in cases:
        volume = read_volume(SHARED / case / "image.nii.gz")
        truth_ijk = read_labels(SHARED / case / "label.nii.gz", volume)
        for label in DEFAULT_LABELS[case]:
            for pol, thr, floor, cand in rules:
                for mode in modes:
                    start = time.perf_counter()
                    session = SegmentationSession(volume, loaded_model=loaded, cache_dir=args.cache_dir)
                    session.candidates = cand
                    truth = session.view.to_view(truth_ijk) == label
                    score = simulate_object(session, truth, label, mode=mode,
                                            stop=StopRules(min_iou_with_previous=thr, min_predicted_iou=floor,
                                                           policy=policies[pol]))
                    # One object per session: its label-map voxels are its own result.
                    span = span_report(session.labels.array == label, truth)
                    rows.append({"case": case, "label": label, "mode": mode, "policy": pol, "min_iou": thr, "min_pred_iou": floor, "candidates": cand, "dice": score.dice,
                                 "nsd": score.nsd, "slices": score.slices_predicted, "truth_slices": score.slices_truth,
                                 **span, "seconds": time.perf_counter() - start})
                    print(f"{case:40s} {label:3d} {pol} iou>={thr} pred>={floor} {cand:10s} {mode:11s} dice {score.dice:.3f} nsd {score.nsd:.3f} "
                          f"slices {score.slices_predicted}/{score.slices_truth} {format_span(span)} "
                          f"{rows[-1]['seconds']:.1f}s", flush=True)
    print("\nmean Dice per mode and stop rule over", len({(r['case'], r['label']) for r in rows}), "objects;",
          "'ends' = objects whose first and last slices are both within 1 slice of the truth's")
    for pol, thr, floor, cand in rules:
        for mode in modes:
            sel = [r for r in rows if r["mode"] == mode and r["policy"] == pol and r["min_iou"] == thr and r["min_pred_iou"] == floor
                   and r["candidates"] == cand]
            within = sum(r["ends_within_1"] for r in sel)
            print(f"  {pol:8s} min_iou {thr!s:6s} min_pred_iou {floor!s:5s} {cand:10s} {mode:11s} "
                  f"{np.mean([r['dice'] for r in sel]):.3f}  ends {within}/{len(sel)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
