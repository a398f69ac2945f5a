"""Compare models and propagation modes with the simulated expert (one GT box on the largest slice,
then propagation), sharing slice embeddings between runs.

    python -m medsam_plugin.training.compare --case DIR[:LABELS] ... \
        --model stock=lite_medsam --model tuned=path/to/ckpt.pth --modes box,mask,box+mask \
        --cache-dir /tmp/emb --json results.json

Each case folder holds image.nii.gz and label.nii.gz. Every (model, mode) runs exactly what
`medsam_plugin.evaluation.run.evaluate_case` runs (a `SegmentationSession` and
`evaluation.simulate.simulate_object`, clicks 0, default stop rules); the only difference is that
the sessions share an on-disk embedding cache, so a checkpoint that only changes the prompt
encoder and mask decoder is evaluated without encoding the slices again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _decoder_only(loaded) -> bool:
    meta_cfg = (loaded.meta or {}).get("config", {})
    return not loaded.meta or meta_cfg.get("train", "decoder") == "decoder"


def compare(cases: list[tuple[Path, list[int] | None]], models: dict[str, str], modes: list[str],
            cache_dir: str | None = None, device: str = "auto", skip: set | None = None, log=print) -> list[dict]:
    """-> rows {case, label, model, mode, dice, nsd, slices_predicted, slices_truth, seconds}."""
    import numpy as np

    from ..engine.choice import ModelChoice
    from ..evaluation.simulate import simulate_object
    from ..io import read_labels, read_volume

    stock = ModelChoice("lite_medsam", device=device).load()
    stock_state = {k: v.clone() for k, v in stock.sam.state_dict().items()
                   if k.startswith(("prompt_encoder.", "mask_decoder."))}
    loaded = {}
    for name, ref in models.items():
        m = stock if ref == "lite_medsam" else ModelChoice(ref, device=device).load()
        loaded[name] = m
    rows = []
    for case_dir, labels in cases:
        volume = read_volume(case_dir / "image.nii.gz")
        truth_ijk = read_labels(case_dir / "label.nii.gz", volume)
        for name, m in loaded.items():
            shared = _decoder_only(m)
            if shared:  # same encoder as the stock model: swap decoder weights, reuse embeddings
                state = stock_state if m is stock else {k: v for k, v in m.sam.state_dict().items()
                                                        if k.startswith(("prompt_encoder.", "mask_decoder."))}
                stock.sam.load_state_dict(state, strict=False)
                runner = stock
            else:
                runner = m
            for mode in modes:
                if skip and (name, mode) in skip:
                    continue
                session = ModelChoice(device=device, cache_dir=cache_dir).session(volume, loaded_model=runner)
                truth_zyx = session.view.to_view(truth_ijk)
                present = [int(v) for v in np.unique(truth_zyx) if v]
                for label in (labels or present):
                    t0 = time.perf_counter()
                    score = simulate_object(session, truth_zyx == label, label, mode=mode)
                    row = {"case": case_dir.name, "label": label, "model": name, "mode": mode,
                           "dice": float(score.dice), "nsd": float(score.nsd),
                           "slices_predicted": score.slices_predicted, "slices_truth": score.slices_truth,
                           "seconds": time.perf_counter() - t0, "encoded": session.predictor.encode_count}
                    rows.append(row)
                    log(f"{row['case']:<40} {label:>3} {name:<8} {mode:<9} dice {row['dice']:.3f} "
                        f"({row['slices_predicted']}/{row['slices_truth']} slices, {row['seconds']:.0f} s, "
                        f"{row['encoded']} encoded)")
        stock.sam.load_state_dict(stock_state, strict=False)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table: one row per (case, label), one column per (model, mode)."""
    cols = []
    for r in rows:
        key = (r["model"], r["mode"])
        if key not in cols:
            cols.append(key)
    keys = []
    for r in rows:
        k = (r["case"], r["label"])
        if k not in keys:
            keys.append(k)
    val = {(r["case"], r["label"], r["model"], r["mode"]): r["dice"] for r in rows}
    out = ["| case | label | " + " | ".join(f"{m} {mo}" for m, mo in cols) + " |",
           "|---|---|" + "---|" * len(cols)]
    for case, label in keys:
        cells = [f"{val[(case, label, m, mo)]:.3f}" if (case, label, m, mo) in val else "" for m, mo in cols]
        out.append(f"| {case} | {label} | " + " | ".join(cells) + " |")
    means = []
    for m, mo in cols:
        v = [val[(c, l, m, mo)] for c, l in keys if (c, l, m, mo) in val]
        means.append(f"{sum(v) / len(v):.3f}" if v else "")
    out.append("| **mean** | | " + " | ".join(means) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", required=True, help="case folder, optionally :LABEL,LABEL")
    p.add_argument("--model", action="append", required=True, help="NAME=registry name or checkpoint path")
    p.add_argument("--modes", default="box,mask,box+mask")
    p.add_argument("--skip", default="", help="NAME/MODE pairs to leave out, comma-separated")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cases = []
    for text in args.case:
        folder, _, labels = text.partition(":")
        cases.append((Path(folder), [int(v) for v in labels.split(",")] if labels else None))
    models = dict(m.split("=", 1) for m in args.model)
    skip = {tuple(s.split("/", 1)) for s in args.skip.split(",") if s}
    rows = compare(cases, models, args.modes.split(","), args.cache_dir, args.device, skip,
                   log=lambda s: print(s, flush=True))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
