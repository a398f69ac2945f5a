"""Could bf16 run most slices and fp32 only the doubtful ones? Per-slice agreement of the two.

Along each shared object's fp32 one-box propagation, every visited slice is also decoded from its
bf16 embedding (OpenVINO bf16) with the very same prompt. Printed: how far the two masks agree
(Dice between them), overall and on slices the model is confident about (predicted IoU >= 0.85),
and the worst slices. If bf16 only went wrong where the model is unsure, re-encoding those few
slices in fp32 would keep fp32's Dice at bf16's speed; if confident slices move too, it cannot.

With --escalate-below T it also runs that scheme end to end: bf16 first, and every slice whose
bf16 answer has a predicted IoU under T re-encoded and answered in fp32; it prints each object's
Dice against fp32's and the share of slices re-encoded.

    python benchmarks/bf16_slice_agreement.py [--path openvino-bf16|bf16] [--escalate-below 0.85]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_dice import LABELS, SHARED  # noqa: E402  (the same objects as the Dice check)


class _BothPredictors:
    """Answers with the fp32 predictor (so the walk is fp32's) and records the other's answer."""

    def __init__(self, reference, other):
        self.reference, self.other, self.records = reference, other, []

    def __getattr__(self, name):
        return getattr(self.reference, name)

    def predict(self, z, **prompt):
        ref, oth = self.reference.predict(z, **prompt), self.other.predict(z, **prompt)
        a, b = ref.mask_yx, oth.mask_yx
        both = int(a.sum() + b.sum())
        self.records.append({"z": int(z), "agreement": 1.0 if both == 0 else 2 * int((a & b).sum()) / both,
                             "area_fp32": int(a.sum()), "area_other": int(b.sum()), "iou_fp32": ref.iou})
        return ref


class _Escalating:
    """bf16 first; a slice whose answer has predicted IoU under `threshold` is redone in fp32."""

    def __init__(self, fast, exact, threshold: float):
        self.fast, self.exact, self.threshold = fast, exact, threshold
        self.seen, self.escalated = set(), set()

    def __getattr__(self, name):
        return getattr(self.fast, name)

    def predict(self, z, **prompt):
        self.seen.add(z)
        if z not in self.escalated:
            answer = self.fast.predict(z, **prompt)
            if answer.iou >= self.threshold:
                return answer
            self.escalated.add(z)
        return self.exact.predict(z, **prompt)


def _dice(mask, truth) -> float:
    return 2 * float((mask & truth).sum()) / float(mask.sum() + truth.sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="openvino-bf16", help="the bf16 encoder path to compare with fp32")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "medsam_plugin_bench_cache"))
    parser.add_argument("--escalate-below", type=float, default=None,
                        help="also run bf16 with fp32 re-encodes of slices whose predicted IoU is under this")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (the team's shared labelled volumes).")
        return 0
    from medsam_plugin.engine.embedding_cache import EmbeddingCache
    from medsam_plugin.engine.predictor import SlicePredictor
    from medsam_plugin.engine.propagation import bounding_box_xyxy, propagate, run_to_completion
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import read_labels, read_volume
    from medsam_plugin.model.fast import build_path
    from medsam_plugin.model.registry import load_model

    loaded = load_model("lite_medsam", device="cpu")
    other_path = build_path(loaded, args.path)
    records, escalations = [], []
    for case, labels in LABELS.items():
        if not (SHARED / case / "image.nii.gz").is_file():
            continue
        volume = read_volume(SHARED / case / "image.nii.gz")
        truth_ijk = read_labels(SHARED / case / "label.nii.gz", volume)
        session = SegmentationSession(volume, loaded_model=loaded)
        for label in labels:
            truth = session.view.to_view(truth_ijk) == label
            pair = []
            for encoder in (None, other_path):
                predictor = SlicePredictor(loaded, EmbeddingCache(disk_dir=args.cache_dir), encoder)
                predictor.set_volume(session.image_u8)
                pair.append(predictor)
            both = _BothPredictors(*pair)
            z0 = int(np.argmax(truth.sum(axis=(1, 2))))
            seed = both.predict(z0, box_xyxy=bounding_box_xyxy(truth[z0]))
            run_to_completion(propagate(both, {z0: seed}))
            for r in both.records:
                r.update(case=case, label=label)
            records += both.records
            agree = np.array([r["agreement"] for r in both.records])
            print(f"  {case:38s} label {label}: {len(agree)} slices, mask agreement median {np.median(agree):.4f}, "
                  f"min {agree.min():.3f}", flush=True)
            if args.escalate_below is not None:
                dice = {}
                for name in ("fp32", "escalating"):
                    for predictor in pair:
                        predictor.set_volume(session.image_u8)  # fresh state, embeddings stay on disk
                    walker = pair[0] if name == "fp32" else _Escalating(pair[1], pair[0], args.escalate_below)
                    seed = walker.predict(z0, box_xyxy=bounding_box_xyxy(truth[z0]))
                    result = run_to_completion(propagate(walker, {z0: seed}))
                    dice[name] = _dice(result.mask_zyx(truth.shape), truth)
                escalations.append((len(walker.escalated), len(walker.seen), dice["escalating"] - dice["fp32"]))
                print(f"    bf16 + fp32 under predicted IoU {args.escalate_below}: Dice {dice['escalating']:.4f} vs "
                      f"fp32 {dice['fp32']:.4f} (delta {dice['escalating'] - dice['fp32']:+.4f}), "
                      f"{len(walker.escalated)} of {len(walker.seen)} slices re-encoded", flush=True)
    agree = np.array([r["agreement"] for r in records])
    sure = np.array([r["agreement"] for r in records if r["iou_fp32"] >= 0.85])
    print(f"\nall {len(agree)} slices: agreement of fp32 and {args.path} masks, same prompt: median {np.median(agree):.4f}, "
          f"5th percentile {np.quantile(agree, 0.05):.4f}; slices under 0.99: {int((agree < 0.99).sum())}")
    if len(sure):
        print(f"confident slices (fp32 predicted IoU >= 0.85), {len(sure)}: median {np.median(sure):.4f}, "
              f"worst {sure.min():.4f}; under 0.99: {int((sure < 0.99).sum())}")
    if escalations:
        redone, seen = sum(e[0] for e in escalations), sum(e[1] for e in escalations)
        worst = max(abs(e[2]) for e in escalations)
        print(f"bf16 with fp32 re-encodes under predicted IoU {args.escalate_below}: {redone} of {seen} slices "
              f"({redone / seen:.0%}) re-encoded; worst |delta Dice| {worst:.4f}; objects past 0.005: "
              f"{sum(abs(e[2]) > 0.005 for e in escalations)} of {len(escalations)}")
    print("worst slices:")
    for r in sorted(records, key=lambda r: r["agreement"])[:8]:
        print(f"  {r['case']:38s} label {r['label']} z {r['z']:3d}: agreement {r['agreement']:.3f}, area fp32 "
              f"{r['area_fp32']} vs {r['area_other']}, fp32 predicted IoU {r['iou_fp32']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
