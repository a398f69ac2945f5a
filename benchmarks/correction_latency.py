"""Issue 21: how long a corrective click takes against a box re-prompt on the same encoded slice.

A correction asks the decoder several ways (`SegmentationSession._answer_correction`); they now go
through one batched decoder call (`SlicePredictor.predict_many`). On the spleen sample's largest
slice, already encoded, this times, interleaved and repeated (median of --repeats):
  box         a box re-prompt (the slice's kept decoder state, `SlicePredictor.predict`)
  correction  one and two corrective clicks through the session (one batched decoder call)
  one by one  the same ways of asking, one `predict` each (how corrections ran before)
and prints ratios to the box re-prompt: only ratios are comparable across machines and loads.

    python benchmarks/correction_latency.py [--model medsam_interactive] [--repeats 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPLEEN = REPO / "sample_data" / "ct_spleen_msd_spleen2_crop"


def main(argv=None) -> int:
    import torch

    from medsam_plugin.engine.propagation import bounding_box_xyxy, interior_point_yx
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import read_labels, read_volume

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="medsam_interactive")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    volume = read_volume(SPLEEN / "image.nii.gz")
    session = SegmentationSession(volume, model=args.model, device="cpu")
    truth = session.view.to_view(read_labels(SPLEEN / "label.nii.gz", volume)) == 1
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    box = bounding_box_xyxy(truth[z])
    obj = session.add_object("spleen").label_id
    session.segment_slice(obj, z, box_xyxy=box)  # encodes the slice; a seed to correct
    predictor = session.predictor
    inside = interior_point_yx(truth[z])
    outside = np.array([box[1] + 2.0, box[0] + 2.0])  # a background click in the box's corner
    clicks = {"1 click": (inside[None], np.array([1])),
              "2 clicks": (np.stack([inside, outside]), np.array([1, 0]))}
    seed = session.seeds[obj][z]

    def ways(points, labels):  # the asks of SegmentationSession._answer_correction, for the timing only
        logits = seed.logits_256
        asks = [dict(points_yx=points, point_labels=labels, box_xyxy=box, mask_logits_256=logits),
                dict(points_yx=points, point_labels=labels, mask_logits_256=logits),
                dict(points_yx=points, point_labels=labels, box_xyxy=box, mask_logits_256=logits / 2),
                dict(points_yx=points[-1:], point_labels=labels[-1:], box_xyxy=box, mask_logits_256=logits)]
        return asks[:-1] if len(points) == 1 else asks

    runs = {"box": lambda: predictor.predict(z, box_xyxy=box)}
    for name, (points, labels) in clicks.items():
        runs[f"correction, {name}"] = (lambda p=points, lb=labels: session.segment_slice(
            obj, z, points_yx=p, point_labels=lb, use_current_mask=True, commit=False))
        runs[f"one by one, {name}"] = (lambda p=points, lb=labels: [predictor.predict(z, **a) for a in ways(p, lb)])
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["box"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<24} {median * 1000:7.0f} ms   {median / base:5.2f}x the box re-prompt")
    calls = predictor.decoder_calls
    session.segment_slice(obj, z, points_yx=clicks["2 clicks"][0], point_labels=clicks["2 clicks"][1],
                          use_current_mask=True, commit=False)
    print(f"decoder calls for one correction: {predictor.decoder_calls - calls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
