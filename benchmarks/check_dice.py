"""Does the fast encoder path change the result? One-box propagation, fp32 vs fast, on every shared case.

For each case and label of ../shared/data: the simulated expert's ground-truth box on the slice
where the label is largest, then the engine's propagation (default box mode, default stop rules),
once with the model's own fp32 encoder and once with the fast path; Dice of each against the
ground truth, and the difference. Target: |Dice(fast) - Dice(fp32)| <= 0.005 on every case.

Embeddings go to an on-disk cache keyed by slice, model and encoder path (fp32 and fast never
mix), so a second run only decodes.

    python benchmarks/check_dice.py [--path auto|bf16|openvino-bf16|...] [--model NAME] [--cases a,b] [--json out.json]
    python benchmarks/check_dice.py --decoders    (the model's own mask decoder vs the fast one)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TOLERANCE = 0.005

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_modes import DEFAULT_LABELS as LABELS  # noqa: E402  (one list of evaluated labels)


def one_box_dice(volume, truth_ijk, label: int, loaded, path_name: str, cache_dir,
                 decoder: str = "fast") -> tuple[float, int, float]:
    """(Dice, slices predicted, seconds) of one-box propagation with encoder path `path_name`."""
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.evaluation.simulate import simulate_object

    # The session builds its encoder and predictor from these variables.
    settings = {"MEDSAM_ENCODER": path_name, "MEDSAM_DECODER": decoder}
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        start = time.perf_counter()
        session = SegmentationSession(volume, loaded_model=loaded, cache_dir=cache_dir)
        truth = session.view.to_view(truth_ijk) == label
        score = simulate_object(session, truth, label)
        return score.dice, score.slices_predicted, time.perf_counter() - start
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(path_name: str = "auto", cases=None, cache_dir=None, loaded=None, log=print,
        compare_decoders: bool = False, model: str = "lite_medsam") -> list[dict] | None:
    """Rows {case, label, dice_fp32, dice_fast, delta, ok}; None when ../shared/data is absent.

    compare_decoders: instead of fp32 vs `path_name` encoders, the model's own mask decoder vs the
    fast one (`model.fast_decoder`), both on `path_name`'s embeddings ("dice_fp32" is then the
    reference decoder's Dice).
    """
    from medsam_plugin.io import read_labels, read_volume
    from medsam_plugin.model.fast import choose_mode
    from medsam_plugin.model.registry import load_model

    if not SHARED.is_dir():
        log(f"skipped: {SHARED} is absent (the team's shared labelled volumes).")
        return None
    loaded = loaded or load_model(model, device="cpu")  # each model in its own default mode and stop rule
    if path_name == "auto":
        path_name, why = choose_mode(loaded, "auto")
        log(f"fast path on this machine: {path_name} ({why})")
    cache_dir = cache_dir or str(Path(tempfile.gettempdir()) / "medsam_plugin_bench_cache")
    rows = []
    for case in cases or LABELS:
        case_dir = SHARED / case
        if not (case_dir / "image.nii.gz").is_file():
            log(f"  {case}: not in {SHARED}, skipped")
            continue
        volume = read_volume(case_dir / "image.nii.gz")
        truth_ijk = read_labels(case_dir / "label.nii.gz", volume)
        for label in LABELS.get(case, [1]):
            if compare_decoders:
                names = ("reference decoder", "fast decoder")
                d32, n32, t32 = one_box_dice(volume, truth_ijk, label, loaded, path_name, cache_dir, "reference")
                dfa, nfa, tfa = one_box_dice(volume, truth_ijk, label, loaded, path_name, cache_dir, "fast")
            else:
                names = ("fp32", path_name)
                d32, n32, t32 = one_box_dice(volume, truth_ijk, label, loaded, "fp32", cache_dir)
                dfa, nfa, tfa = one_box_dice(volume, truth_ijk, label, loaded, path_name, cache_dir)
            row = {"case": case, "label": label, "path": path_name, "dice_fp32": d32, "dice_fast": dfa,
                   "delta": dfa - d32, "slices_fp32": n32, "slices_fast": nfa, "ok": abs(dfa - d32) <= TOLERANCE}
            rows.append(row)
            log(f"  {case:38s} label {label}: Dice {names[0]} {d32:.4f}  {names[1]} {dfa:.4f}  delta {dfa - d32:+.4f} "
                f"slices {n32}/{nfa}  {'ok' if row['ok'] else 'OVER TOLERANCE'}  ({t32:.0f}s + {tfa:.0f}s)")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="auto", help="encoder path to check against fp32 (default: auto's choice)")
    parser.add_argument("--cases", default=None, help="comma-separated case ids (default: all)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--model", default="lite_medsam", help="registered model (default: lite_medsam)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--decoders", action="store_true",
                        help="compare the model's own mask decoder with the fast one, on --path's embeddings")
    args = parser.parse_args(argv)
    rows = run(args.path, args.cases.split(",") if args.cases else None, args.cache_dir,
               log=lambda s: print(s, flush=True), compare_decoders=args.decoders, model=args.model)
    if rows is None:
        return 0
    worst = max((abs(r["delta"]) for r in rows), default=0.0)
    print(f"worst |delta Dice| {worst:.4f} over {len(rows)} objects (tolerance {TOLERANCE})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
