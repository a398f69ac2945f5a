"""Issue 21: slices left empty between two seeds of one object, and the object's ends.

For each case, GT boxes on a few slices of one label (the seeds), then propagation with the
model's own mode and stop policy, once per `propagation.GAP_FILLS` rule. Prints, per rule, how
many slices between the outermost seeds hold truth but came out empty, the Dice over those
slices and over the whole object, and the predicted span against the truth's.

    python benchmarks/seed_gaps.py [--model medsam_interactive] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

# (case, label, seed slices: "largest" stands for the label's largest slice)
CASES = [
    ("mr_brain_edema_brats2021_01646", 1, (42, "largest", 67)),  # the three boxes
    ("mr_brain_edema_brats2021_01646", 1, (42, 67)),
    ("ct_spleen_msd_spleen2_crop", 1, ("largest",)),  # its ends: truth 3-22
    ("ct_spleen_msd_spleen2_crop", 1, (6, 19)),
]


def main(argv=None) -> int:
    import torch

    from medsam_plugin.engine.propagation import (GAP_FILLS, StopRules, bounding_box_xyxy, policy_for_model,
                                                  propagate, run_to_completion)
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.evaluation.metrics import dice
    from medsam_plugin.io import read_labels, read_volume

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="medsam_interactive")
    parser.add_argument("--cache-dir", default=None, help="keep slice embeddings here between runs")
    parser.add_argument("--cases", default=None, help="comma-separated indices into CASES (default: all)")
    args = parser.parse_args(argv)
    chosen = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = None
    for case, label, wanted in chosen:
        folder = SHARED / case
        if not folder.is_dir():
            print(f"skip {case}: not in {SHARED}")
            continue
        volume = read_volume(folder / "image.nii.gz")
        session = SegmentationSession(volume, model=args.model, device="cpu", loaded_model=loaded,
                                      cache_dir=args.cache_dir)
        loaded = session.loaded_model
        predictor = session.predictor
        truth = session.view.to_view(read_labels(folder / "label.nii.gz", volume)) == label
        present = np.flatnonzero(truth.any(axis=(1, 2)))
        largest = int(np.argmax(truth.sum(axis=(1, 2))))
        zs = sorted({largest if z == "largest" else int(z) for z in wanted})
        seeds = {z: predictor.predict(z, box_xyxy=bounding_box_xyxy(truth[z])) for z in zs}
        stop = StopRules(policy=policy_for_model(predictor.spec))
        print(f"\n{case} label {label}: truth slices {present[0]}-{present[-1]}, seeds {zs}, mode {session.mode}",
              flush=True)
        for rule in GAP_FILLS:
            t0 = time.perf_counter()
            result = run_to_completion(propagate(predictor, seeds, mode=session.mode, stop=stop, gap_fill=rule))
            seconds = time.perf_counter() - t0
            mask = result.mask_zyx(truth.shape)
            between = range(zs[0] + 1, zs[-1])
            holes = [z for z in between if truth[z].any() and not mask[z].any()]
            gap_dice = dice(mask[zs[0]:zs[-1] + 1], truth[zs[0]:zs[-1] + 1])
            span = f"{min(result.slices)}-{max(result.slices)}"
            print(f"  {rule:<8} empty between seeds: {holes or 'none'}; Dice between seeds {gap_dice:.3f}, "
                  f"whole {dice(mask, truth):.3f}; span {span}; {seconds:.1f} s", flush=True)
            for name, why in result.stopped.items():
                print(f"           {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
