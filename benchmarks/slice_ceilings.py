"""What per-slice answers could give a walk at best: 3D Dice over each object's true extent when
every slice is prompted from the truth instead of from the walk.

Per object (validation sarcoma patients by default), every slice that holds it is answered four ways:
- ``copy``: no model, the previous slice's true mask taken as the answer (how alike neighbours are);
- ``box``: the model given the slice's own ground-truth box (a perfect box tracker);
- ``box+mask``: the model given what propagation would carry from a perfect previous slice (the
  neighbour towards the object's largest slice, where a walk from a seed there comes from): its
  true mask as dense logits (+-8) and its box widened as the engine widens it;
- ``mask``: the true previous mask alone.
A model whose ``box+mask`` is no better than ``copy`` copies the carried mask; its walk then keeps
whatever error the mask has (the tumour's taper, say) instead of reading it off the image.

    python benchmarks/slice_ceilings.py [--models medsam_interactive,lite_medsam,PATH] [--sets sarcoma]

Needs ../shared/lesions (skips with a message where it is absent).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lesions import each_lesion, lesion_args  # noqa: E402

WAYS = ("copy", "box", "box+mask", "mask")


def ceilings(loaded, volume, truth_ijk, cache_dir) -> dict[str, float]:
    from medsam_plugin.engine.propagation import bounding_box_xyxy, prompt_from_previous
    from medsam_plugin.engine.predictor import SlicePrediction
    from medsam_plugin.engine.session import SegmentationSession, mask_logits_256

    session = SegmentationSession(volume, loaded_model=loaded, cache_dir=cache_dir)
    truth = session.view.to_view(truth_ijk) > 0
    hw = truth.shape[1:]
    areas = truth.sum(axis=(1, 2))
    z0 = int(np.argmax(areas))
    counts = {w: [0, 0] for w in WAYS}  # intersection, predicted area
    for z in np.flatnonzero(areas):
        # The slice a walk from the largest slice comes from; for the largest slice, a neighbour
        # holding the object (its own mask only where no neighbour holds it: a gap in z).
        step = 1 if z < z0 else -1
        if z == z0:
            step = -1 if z > 0 and areas[z - 1] else 1
        before = truth[z + step] if 0 <= z + step < len(areas) and areas[z + step] else truth[z]
        carried = SlicePrediction(z=int(z) + step, mask_yx=before, logits_256=mask_logits_256(before), iou=1.0, prompt={})
        answers = {
            "copy": before,
            "box": session.predictor.predict(int(z), box_xyxy=bounding_box_xyxy(truth[z])).mask_yx,
            "box+mask": session.predictor.predict(int(z), **prompt_from_previous(carried, "box+mask", hw)).mask_yx,
            "mask": session.predictor.predict(int(z), **prompt_from_previous(carried, "mask", hw)).mask_yx,
        }
        for way, mask in answers.items():
            counts[way][0] += int((mask & truth[z]).sum())
            counts[way][1] += int(mask.sum())
    total = int(truth.sum())
    return {w: 2.0 * i / (a + total) for w, (i, a) in counts.items()}


def main(argv=None) -> int:
    args = lesion_args(__doc__, argv, "--models", "medsam_interactive,lite_medsam")
    if args is None:
        return 0
    import torch

    from medsam_plugin.model.registry import load_model

    torch.set_num_threads(2)
    rows = []
    for name in args.models.split(","):
        loaded = load_model(name)
        for c, volume, truth_ijk in each_lesion(args.sets.split(",")):
            d = ceilings(loaded, volume, truth_ijk, args.cache_dir)
            rows.append((name, c["group"], d))
            print(f"  {c['case']} {name}: " + " ".join(f"{w} {d[w]:.3f}" for w in WAYS), flush=True)
    print("| model | group | n | " + " | ".join(WAYS) + " |")
    print("|---|---|---|" + "---|" * len(WAYS))
    for name in args.models.split(","):
        for group in sorted({g for _, g, _ in rows}) + ["all"]:
            sel = [d for m, g, d in rows if m == name and (group == "all" or g == group)]
            print(f"| {name} | {group} | {len(sel)} | " + " | ".join(f"{np.mean([d[w] for d in sel]):.3f}" for w in WAYS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
