"""Which propagation prompt mode works best? One-box simulated expert on every shared case.

For each case and label: the ground-truth box on the slice where the label is largest, then
propagation in each mode; Dice against the ground truth. Embeddings are computed once per case
(on-disk cache) and shared by all modes, so the comparison costs one encode per slice.

    python benchmarks/compare_modes.py [--modes box,mask,...] [--model lite_medsam] [--json out.json]
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
    from medsam_plugin.engine.propagation import PROMPT_MODES, StopRules
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.evaluation.simulate import simulate_object
    from medsam_plugin.io import read_labels, read_volume
    from medsam_plugin.model.registry import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(PROMPT_MODES))
    parser.add_argument("--min-iou", default="0.5", help="comma-separated overlap thresholds to compare")
    parser.add_argument("--min-pred-iou", default="none", help="comma-separated predicted-IoU floors to compare")
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
    thresholds = [None if t in ("none", "") else float(t) for t in args.min_iou.split(",")]
    floors = [None if t in ("none", "") else float(t) for t in args.min_pred_iou.split(",")]
    rules = [(thr, floor, cand) for thr in thresholds for floor in floors for cand in args.candidates.split(",")]
    cases = args.cases.split(",") if args.cases else list(DEFAULT_LABELS)
    loaded = load_model(args.model)
    rows = []
    for case in cases:
        volume = read_volume(SHARED / case / "image.nii.gz")
        truth_ijk = read_labels(SHARED / case / "label.nii.gz", volume)
        for label in DEFAULT_LABELS[case]:
            for thr, floor, cand in rules:
                for mode in modes:
                    start = time.perf_counter()
                    session = SegmentationSession(volume, loaded_model=loaded, cache_dir=args.cache_dir)
                    session.candidates = cand
                    truth = session.view.to_view(truth_ijk) == label
                    score = simulate_object(session, truth, label, mode=mode,
                                            stop=StopRules(min_iou_with_previous=thr, min_predicted_iou=floor))
                    rows.append({"case": case, "label": label, "mode": mode, "min_iou": thr, "min_pred_iou": floor, "candidates": cand, "dice": score.dice,
                                 "nsd": score.nsd, "slices": score.slices_predicted, "truth_slices": score.slices_truth,
                                 "seconds": time.perf_counter() - start})
                    print(f"{case:40s} {label:3d} iou>={thr} pred>={floor} {cand:10s} {mode:11s} dice {score.dice:.3f} nsd {score.nsd:.3f} "
                          f"slices {score.slices_predicted}/{score.slices_truth} {rows[-1]['seconds']:.1f}s", flush=True)
    print("\nmean Dice per mode and stop rule over", len({(r['case'], r['label']) for r in rows}), "objects")
    for thr, floor, cand in rules:
        for mode in modes:
            d = [r["dice"] for r in rows if r["mode"] == mode and r["min_iou"] == thr and r["min_pred_iou"] == floor
                 and r["candidates"] == cand]
            print(f"  min_iou {thr!s:5s} min_pred_iou {floor!s:5s} {cand:10s} {mode:11s} {np.mean(d):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
