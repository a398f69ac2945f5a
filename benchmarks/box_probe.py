"""Does the image tell a walk where the object ends? Each validation sarcoma is walked from the
ground-truth box on its largest slice with no stop rule (box+mask, as propagation carries); on every
walked slice the model is also asked with the propagation box alone (the previous answer's box plus
3 px, no mask). Printed per distance from the tumour's nearer end (negative: past it): the box-only
answer's area over the carried one's, and their overlap (IoU). A model that reads the object's end
off the image gives a box-only answer that shrinks, or moves away, past the end.

    python benchmarks/box_probe.py [--model medsam_interactive] [--sets sarcoma]

Needs ../shared/lesions (skips with a message where it is absent).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lesions import each_lesion, lesion_args  # noqa: E402

BANDS = (("past the end", lambda d: d < 0), ("last slice", lambda d: d == 0),
         ("1-2 slices in", lambda d: 1 <= d <= 2), ("3+ slices in", lambda d: d >= 3))


def probe(loaded, volume, truth_ijk, cache_dir) -> list[tuple[int, float, float]]:
    """[(distance from the nearer end, box-only area / carried area, IoU of the two)] per walked slice."""
    from medsam_plugin.engine.propagation import (StopPolicy, StopRules, bounding_box_xyxy, mask_iou,
                                                  prompt_from_previous, run_to_completion)
    from medsam_plugin.engine.session import SegmentationSession

    session = SegmentationSession(volume, loaded_model=loaded, cache_dir=cache_dir)
    truth = session.view.to_view(truth_ijk) > 0
    areas = truth.sum(axis=(1, 2))
    present, z0 = np.flatnonzero(areas), int(np.argmax(areas))
    obj = session.add_object()
    seed = session.segment_slice(obj.label_id, z0, box_xyxy=bounding_box_xyxy(truth[z0]))
    walk = run_to_completion(session.propagate(obj.label_id, stop=StopRules(policy=StopPolicy.off())))
    answers = {**walk.predictions, z0: seed}
    rows = []
    for z in sorted(walk.predictions):
        previous = answers[z - 1] if z > z0 else answers[z + 1]
        carried = answers[z].mask_yx
        box_only = session.predictor.predict(z, **prompt_from_previous(previous, "box", truth.shape[1:])).mask_yx
        distance = int(min(z - present[0], present[-1] - z))
        rows.append((distance, box_only.sum() / max(1, carried.sum()), mask_iou(box_only, carried)))
    return rows


def main(argv=None) -> int:
    args = lesion_args(__doc__, argv, "--model", "medsam_interactive")
    if args is None:
        return 0
    import torch

    from medsam_plugin.model.registry import load_model

    torch.set_num_threads(2)
    loaded = load_model(args.model)
    rows = []
    for c, volume, truth_ijk in each_lesion(args.sets.split(",")):
        rows += probe(loaded, volume, truth_ijk, args.cache_dir)
        print(f"  probed {c['case']}", flush=True)
    rows = np.array(rows, dtype=float)
    print(f"model {args.model}")
    print("| slices | n | box-only area / carried area (median) | IoU of the two (median) | IoU (10th percentile) |")
    print("|---|---|---|---|---|")
    for name, member in BANDS:
        sel = rows[[member(d) for d in rows[:, 0]]]
        if len(sel):
            print(f"| {name} | {len(sel)} | {np.median(sel[:, 1]):.2f} | {np.median(sel[:, 2]):.2f} | "
                  f"{np.percentile(sel[:, 2], 10):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
