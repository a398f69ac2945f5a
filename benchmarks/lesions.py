"""Models side by side on real lesions: the validation patients of the lesion split (soft-tissue
sarcoma, CT and MR T1, never trained on) and the ISLES'22 stroke case, as a new user would try them.

For every object and model (a fresh session each time, embeddings shared through one disk cache):
- ``box``: the ground-truth box on the slice where the lesion is largest, then propagation in the
  model's default mode: seed Dice (2D), 3D Dice, and whether both ends of the walk lie within one
  slice of the truth's ends;
- ``click``: one click at the lesion's deepest point on that slice, then propagation: the same;
- ``box+5`` and ``click+5``: five corrective clicks after each (the CVPR 2025 rule of
  `evaluation.simulate.largest_error_click`), Dice per round.
Then the issue's targets, CT, MR and stroke reported apart.

    python benchmarks/lesions.py [--models lite_medsam,medsam_interactive,PATH] [--clicks 5]
        [--sets sarcoma,stroke] [--json out.json] [--merge earlier.json]
Needs ../shared/lesions (skips with a message where it is absent).
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
SHARED = REPO.parent / "shared"
DATALIST = REPO / "recipes" / "lesion_datalist.json"
STROKE = ("isles22_0009_dwi", "isles22_0009_adc")


def case_sets(sets: list[str]) -> list[dict]:
    """[{case, image, label, group}] of the chosen sets, paths under ../shared."""
    out = []
    if "sarcoma" in sets:
        for c in json.loads(DATALIST.read_text())["validation"]:
            out.append({"case": c["name"], "image": SHARED / c["image"], "label": SHARED / c["label"],
                        "group": "sarcoma " + c["modality"]})
    if "stroke" in sets:
        for name in STROKE:
            out.append({"case": name, "image": SHARED / "lesions" / name / "image.nii.gz",
                        "label": SHARED / "lesions" / name / "label.nii.gz", "group": "stroke MR"})
    if "train" in sets:  # a few training patients, to see what the model learned (not a target)
        for c in json.loads(DATALIST.read_text())["training"][:6]:
            if c["name"].startswith("ibsi_"):
                out.append({"case": c["name"], "image": SHARED / c["image"], "label": SHARED / c["label"],
                            "group": "train " + c["modality"]})
    return out


def lesion_args(doc: str, argv, model_flag: str, model_default: str):
    """The command line the one-question lesion benchmarks share (a model flag, --sets, --cache-dir);
    None, after saying so, where ../shared/lesions is absent."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(model_flag, default=model_default)
    ap.add_argument("--sets", default="sarcoma")
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "medsam_plugin_bench_cache"))
    args = ap.parse_args(argv)
    if not (SHARED / "lesions").is_dir():
        print(f"skipped: {SHARED / 'lesions'} is absent (the team's shared lesion volumes).")
        return None
    return args


def each_lesion(sets: list[str]):
    """(case, volume, truth in the volume's voxels) of every case of `sets`, read as the engine reads them."""
    from medsam_plugin.io import read_labels, read_volume

    for c in case_sets(sets):
        volume = read_volume(c["image"])
        yield c, volume, read_labels(c["label"], volume)


def run(loaded, volume, truth_ijk, label: int, protocol: str, clicks: int, cache_dir) -> dict:
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.evaluation.simulate import simulate_object

    session = SegmentationSession(volume, loaded_model=loaded, cache_dir=cache_dir)
    truth = session.view.to_view(truth_ijk) == label
    return simulate_object(session, truth, label, name=f"label {label}", clicks=clicks, protocol=protocol).as_dict()


def measure(loaded, case: dict, clicks: int, cache_dir, model_name: str) -> list[dict]:
    from medsam_plugin.io import read_labels, read_volume

    volume = read_volume(case["image"])
    truth_ijk = read_labels(case["label"], volume)
    rows = []
    for label in [int(v) for v in np.unique(truth_ijk) if v != 0]:
        t0 = time.perf_counter()
        row = {"case": case["case"], "group": case["group"], "label": label, "model": model_name}
        for protocol in ("box", "click"):
            plain = run(loaded, volume, truth_ijk, label, protocol, 0, cache_dir)
            row[protocol] = {"seed": plain["seed_dice"], "dice": plain["dice_own"], "span": plain["span"]}
            if clicks:
                row[protocol]["rounds"] = run(loaded, volume, truth_ijk, label, protocol, clicks, cache_dir)["dice_per_round"]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  {case['case']} {model_name}: box seed {row['box']['seed']:.3f} 3D {row['box']['dice']:.3f} "
              f"ends {_ends(row['box']['span'])} | click seed {row['click']['seed']:.3f} 3D {row['click']['dice']:.3f} "
              f"ends {_ends(row['click']['span'])} | rounds box "
              + " ".join(f"{d:.3f}" for d in row["box"].get("rounds", []))
              + " click " + " ".join(f"{d:.3f}" for d in row["click"].get("rounds", []))
              + f" ({row['seconds']:.0f} s)", flush=True)
    return rows


def _ends(span: dict) -> str:
    if not span or span.get("overshoot_low") is None:
        return "-"
    return f"{span['overshoot_low']:+d}/{span['overshoot_high']:+d}"


def _rounds(rows, protocol: str, clicks: int) -> np.ndarray:
    # A run that ended early (no error left) keeps its last value.
    return np.array([(r[protocol]["rounds"] + [r[protocol]["rounds"][-1]] * clicks)[:clicks + 1] for r in rows])


def summary(rows: list[dict], clicks: int) -> list[str]:
    lines = ["| group | model | n | seed box | 3D box | box ends within 1 | seed click | 3D click | click ends within 1 |"
             + (" box + clicks (per round) | click + clicks (per round) |" if clicks else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if clicks else "")]
    groups = sorted({r["group"] for r in rows})
    for group in groups + ["all validation"]:
        for model in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == model
                    and (r["group"] == group or (group == "all validation" and not r["group"].startswith("train")))]
            if not mine:
                continue
            cells = [group, model, str(len(mine)),
                     f"{np.mean([r['box']['seed'] for r in mine]):.3f}", f"{np.mean([r['box']['dice'] for r in mine]):.3f}",
                     f"{sum(bool(r['box']['span'].get('ends_within_1')) for r in mine)}/{len(mine)}",
                     f"{np.mean([r['click']['seed'] for r in mine]):.3f}", f"{np.mean([r['click']['dice'] for r in mine]):.3f}",
                     f"{sum(bool(r['click']['span'].get('ends_within_1')) for r in mine)}/{len(mine)}"]
            if clicks and all("rounds" in r["box"] for r in mine):
                cells += [" ".join(f"{v:.3f}" for v in _rounds(mine, p, clicks).mean(axis=0)) for p in ("box", "click")]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def targets(rows: list[dict], model: str, clicks: int) -> list[tuple[str, str, bool]]:
    """The issue's targets for `model` on the sarcoma validation patients (every case)."""
    mine = [r for r in rows if r["model"] == model and r["group"].startswith("sarcoma")]
    if not mine:
        return []
    out = []
    seed_click, click_3d = np.mean([r["click"]["seed"] for r in mine]), np.mean([r["click"]["dice"] for r in mine])
    out.append(("one click: mean seed Dice >= 0.88", f"{seed_click:.3f}", seed_click >= 0.88))
    out.append(("one click: mean 3D Dice >= 0.80", f"{click_3d:.3f}", click_3d >= 0.80))
    box_3d = np.mean([r["box"]["dice"] for r in mine])
    out.append(("one box: mean 3D Dice >= 0.82", f"{box_3d:.3f}", box_3d >= 0.82))
    within = np.mean([bool(r["box"]["span"].get("ends_within_1")) for r in mine])
    out.append(("one box: >= 80% of objects end within one slice at both ends", f"{100 * within:.0f}%", within >= 0.8))
    if clicks and all("rounds" in r[p] for r in mine for p in ("box", "click")):
        for p in ("box", "click"):
            rounds = _rounds(mine, p, clicks)
            means = rounds.mean(axis=0)
            worst = float(np.min(np.diff(rounds, axis=1)))
            out.append((f"{clicks} clicks after the {p}: mean rises every round", " ".join(f"{m:.3f}" for m in means),
                        bool(np.all(np.diff(means) > 0))))
            out.append((f"{clicks} clicks after the {p}: no object loses > 0.02 in a round", f"worst {worst:+.3f}",
                        worst >= -0.02))
            out.append((f"{clicks} clicks after the {p}: round {clicks} >= round 0 + 0.05",
                        f"{means[-1]:.3f} vs {means[0]:.3f}", means[-1] >= means[0] + 0.05))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lite_medsam,medsam_interactive",
                        help="registered names or checkpoint paths, comma-separated")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--sets", default="sarcoma,stroke", help="sarcoma, stroke, train (a few training patients)")
    parser.add_argument("--cases", default=None, help="only these case ids")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "medsam_plugin_bench_cache"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--merge", action="append", default=[], help="rows of an earlier run's --json, shown beside these")
    args = parser.parse_args(argv)
    if not (SHARED / "lesions").is_dir():
        print(f"skipped: {SHARED / 'lesions'} is absent (the team's shared lesion volumes).")
        return 0
    from medsam_plugin.model.fast import cpu_model_name
    from medsam_plugin.model.registry import load_model

    cases = case_sets([s for s in args.sets.split(",") if s])
    if args.cases:
        cases = [c for c in cases if c["case"] in args.cases.split(",")]
    models = [m for m in args.models.split(",") if m]
    print(f"machine: {cpu_model_name()}; models {', '.join(models)}; {len(cases)} cases; clicks {args.clicks}")
    rows: list[dict] = []
    for path in args.merge:
        rows += json.loads(Path(path).read_text())["rows"]
    for name in models:
        loaded = load_model(name, device="auto")
        label = Path(name).stem if name.endswith(".pth") else name
        for case in cases:
            rows += measure(loaded, case, args.clicks, args.cache_dir, label)
            if args.json:  # written as it goes: a long run stopped halfway keeps what it measured
                Path(args.json).write_text(json.dumps({"rows": rows, "clicks": args.clicks}, indent=1))
    print("\n" + "\n".join(summary(rows, args.clicks)))
    for model in dict.fromkeys(r["model"] for r in rows):
        result = targets(rows, model, args.clicks)
        if result:
            print(f"\nTargets, {model}:")
            for what, measured, met in result:
                print(f"  [{'met' if met else 'NOT met'}] {what}: {measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
