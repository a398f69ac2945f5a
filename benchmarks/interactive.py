"""Stock LiteMedSAM beside the interactive model, measured one way: every shared case and label.

For each object (fresh session, so each object's own result is scored), each model:
- seed Dice (2D, the prompted slice before propagation) from the ground-truth box and from one
  click at the object's deepest point, on the slice where it is largest;
- 3D Dice of the box protocol in each propagation mode, of the click protocol and of box3d
  (the walk limited to the label's z-extent), in the model's default mode;
- Dice per round of `--clicks` corrective clicks after the box protocol (default mode).
Then the targets of the issue "A model that answers clicks", on the validation cases (those the
shipped model never trained on), and the same figures for the training cases apart.

    python benchmarks/interactive.py [--models lite_medsam,medsam_interactive] [--clicks 5]
        [--cases id,...] [--all-labels] [--json out.json]
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
DATALIST = REPO / "recipes" / "interactive_datalist.json"
# Training cases are scored on the labels compare_modes.py uses (TotalSegmentator has 64 labels);
# validation cases on every label.
TRAIN_LABELS = {"ct_spleen_msd_spleen2_crop": [1], "ct_abdomen_totalseg_sm": [5], "mr_abdomen_totalseg_sm": [5]}


def case_split() -> tuple[list[str], list[str]]:
    raw = json.loads(DATALIST.read_text())
    return [c["name"] for c in raw["training"]], [c["name"] for c in raw["validation"]]


def run_object(loaded, volume, truth_zyx_of, label, protocol, mode, clicks, cache_dir):
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.evaluation.simulate import simulate_object

    session = SegmentationSession(volume, loaded_model=loaded, cache_dir=cache_dir)
    truth = truth_zyx_of(session) == label
    score = simulate_object(session, truth, label, name=f"label {label}", clicks=clicks, mode=mode, protocol=protocol)
    return score.as_dict()


def measure(loaded, case_id: str, labels, modes, clicks: int, cache_dir) -> list[dict]:
    from medsam_plugin.io import read_labels, read_volume

    volume = read_volume(SHARED / case_id / "image.nii.gz")
    truth_ijk = read_labels(SHARED / case_id / "label.nii.gz", volume)
    present = [int(v) for v in np.unique(truth_ijk) if v != 0]
    labels = present if labels is None else [v for v in labels if v in present]
    default = loaded.spec.default_mode
    rows = []
    for label in labels:
        t0 = time.perf_counter()
        row = {"case": case_id, "label": label, "model": loaded.spec.name, "default_mode": default, "modes": {}}
        view_truth = lambda s: s.view.to_view(truth_ijk)  # noqa: E731
        with_clicks = run_object(loaded, volume, view_truth, label, "box", default, clicks, cache_dir)
        row["seed_box"] = with_clicks["seed_dice"]
        row["modes"][default] = with_clicks["dice_per_round"][0]
        row["dice_per_round"] = with_clicks["dice_per_round"]
        row["dsc_auc"], row["nsd_auc"] = with_clicks["dsc_auc"], with_clicks["nsd_auc"]
        for mode in modes:
            if mode != default:
                row["modes"][mode] = run_object(loaded, volume, view_truth, label, "box", mode, 0, cache_dir)["dice_own"]
        click = run_object(loaded, volume, view_truth, label, "click", default, 0, cache_dir)
        row["seed_click"], row["click_3d"] = click["seed_dice"], click["dice_own"]
        box3d = run_object(loaded, volume, view_truth, label, "box3d", default, 0, cache_dir)
        row["box3d"] = box3d["dice_own"]
        no_click = run_object(loaded, volume, view_truth, label, "box", default, 0, cache_dir)
        row["span"] = no_click["span"]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  {case_id} label {label} {loaded.spec.name}: seed box {row['seed_box']:.3f} click "
              f"{row['seed_click']:.3f} | 3D " + " ".join(f"{m} {d:.3f}" for m, d in row["modes"].items())
              + f" click {row['click_3d']:.3f} box3d {row['box3d']:.3f} | rounds "
              + " ".join(f"{d:.3f}" for d in row["dice_per_round"]) + f" ({row['seconds']:.0f} s)", flush=True)
    return rows


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def targets(rows: list[dict], stock: str, new: str) -> list[tuple[str, str, bool]]:
    """The issue's targets on these rows: (target, measured, met)."""
    key = lambda r: (r["case"], r["label"])  # noqa: E731
    s = {key(r): r for r in rows if r["model"] == stock}
    n = {key(r): r for r in rows if r["model"] == new}
    both = [k for k in n if k in s]
    if not both:
        return []
    out = []
    click = _mean(n[k]["seed_click"] for k in both)
    out.append(("click protocol: mean seed_dice >= 0.75", f"{click:.3f} (stock {_mean(s[k]['seed_click'] for k in both):.3f})",
                click >= 0.75))
    box_new, box_stock = _mean(n[k]["seed_box"] for k in both), _mean(s[k]["seed_box"] for k in both)
    out.append(("box protocol: mean seed_dice >= stock - 0.01", f"{box_new:.3f} vs stock {box_stock:.3f}",
                box_new >= box_stock - 0.01))
    rounds = np.array([n[k]["dice_per_round"] + [n[k]["dice_per_round"][-1]] * (6 - len(n[k]["dice_per_round"]))
                       for k in both])[:, :6]
    means = rounds.mean(axis=0)
    never_falls = bool(np.all(np.diff(means) >= -1e-9))
    worst_drop = float(np.min(np.diff(rounds, axis=1))) if rounds.shape[1] > 1 else 0.0
    out.append(("5 clicks: mean never falls", " -> ".join(f"{m:.3f}" for m in means), never_falls))
    out.append(("5 clicks: no object loses > 0.02 at any round", f"worst round-to-round change {worst_drop:+.3f}",
                worst_drop >= -0.02))
    out.append(("5 clicks: round 5 >= round 0 + 0.10", f"{means[-1]:.3f} vs {means[0]:.3f}", means[-1] >= means[0] + 0.10))
    mode_new = n[both[0]]["default_mode"]
    new_3d = np.array([n[k]["modes"][mode_new] for k in both])
    if not all("box" in s[k]["modes"] for k in both):
        return out  # the baseline was not run in box mode (--modes): nothing to compare with
    stock_3d = np.array([s[k]["modes"]["box"] for k in both])
    out.append((f"propagation: default mode ({mode_new}) mean >= stock box + 0.03",
                f"{new_3d.mean():.3f} vs stock {stock_3d.mean():.3f}", new_3d.mean() >= stock_3d.mean() + 0.03))
    out.append(("propagation: no object worse than stock box by > 0.03", f"worst {np.min(new_3d - stock_3d):+.3f}",
                bool(np.min(new_3d - stock_3d) >= -0.03)))
    if all("mask" in n[k]["modes"] and "box+mask" in n[k]["modes"] for k in both):
        m = _mean(n[k]["modes"]["mask"] for k in both)
        bm = _mean(n[k]["modes"]["box+mask"] for k in both)
        out.append(("mask-only propagation >= 0.85 of box+mask", f"{m:.3f} / {bm:.3f} = {m / bm:.2f}", m >= 0.85 * bm))
    return out


def print_table(rows: list[dict], title: str, clicks: int) -> None:
    if not rows:
        return
    modes = sorted({m for r in rows for m in r["modes"]})
    print(f"\n## {title}\n")
    head = ["case", "label", "model", "seed box", "seed click"] + [f"3D {m}" for m in modes] + \
        ["3D click", "3D box3d"] + [f"r{i}" for i in range(clicks + 1)] + ["span ends"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        span = r.get("span") or {}
        ends = f"{span.get('overshoot_low'):+d}/{span.get('overshoot_high'):+d}" if span.get("overshoot_low") is not None else "-"
        rounds = r["dice_per_round"] + [float("nan")] * (clicks + 1 - len(r["dice_per_round"]))
        cells = [r["case"].replace("mr_brain_tumour_", "").replace("mr_brain_edema_", ""), str(r["label"]), r["model"],
                 f"{r['seed_box']:.3f}", f"{r['seed_click']:.3f}"] + \
            [f"{r['modes'][m]:.3f}" if m in r["modes"] else "" for m in modes] + \
            [f"{r['click_3d']:.3f}", f"{r['box3d']:.3f}"] + [f"{d:.3f}" for d in rounds[:clicks + 1]] + [ends]
        print("| " + " | ".join(cells) + " |")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        means = [f"{_mean(r['seed_box'] for r in mine):.3f}", f"{_mean(r['seed_click'] for r in mine):.3f}"] + \
            [f"{_mean(r['modes'].get(m) for r in mine):.3f}" if any(m in r["modes"] for r in mine) else "" for m in modes] + \
            [f"{_mean(r['click_3d'] for r in mine):.3f}", f"{_mean(r['box3d'] for r in mine):.3f}"]
        rounds = np.array([(r["dice_per_round"] + [r["dice_per_round"][-1]] * clicks)[:clicks + 1] for r in mine])
        within = sum(bool((r.get("span") or {}).get("ends_within_1")) for r in mine)
        print("| **mean** | | " + model + " | " + " | ".join(means) + " | "
              + " | ".join(f"{v:.3f}" for v in rounds.mean(axis=0)) + f" | {within}/{len(mine)} within 1 |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lite_medsam,medsam_interactive")
    parser.add_argument("--modes", default="box,mask,box+mask", help="propagation modes for the box protocol")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--cases", default=None, help="comma-separated case ids (default: all of the datalist)")
    parser.add_argument("--all-labels", action="store_true", help="every label of the training cases too")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "medsam_plugin_bench_cache"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--merge", default=None,
                        help="rows of an earlier run's --json to print beside these (e.g. stock measured before)")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (the team's shared labelled volumes).")
        return 0
    from medsam_plugin.model.fast import cpu_model_name
    from medsam_plugin.model.registry import load_model

    train, val = case_split()
    cases = args.cases.split(",") if args.cases else val + train
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    print(f"machine: {cpu_model_name()}; models {', '.join(models)}; clicks {args.clicks}")
    from medsam_plugin.evaluation.simulate import CLICK_RULE

    rows: list[dict] = []
    if args.merge:
        merged = json.loads(Path(args.merge).read_text())
        rows = merged["rows"]
        if merged.get("click_rule") != CLICK_RULE:
            print(f"warning: {args.merge} was measured with another corrective-click rule "
                  f"({merged.get('click_rule') or 'the worst slice, before the rule was named'}); its rounds "
                  "are not comparable with these (seeds and propagation are).")
    for name in models:
        loaded = load_model(name, device="auto")
        for case in cases:
            labels = None if (case in val or args.all_labels) else TRAIN_LABELS.get(case)
            rows += measure(loaded, case, labels, modes, args.clicks, args.cache_dir)
    val_rows = [r for r in rows if r["case"] in val]
    train_rows = [r for r in rows if r["case"] in train]
    print_table(val_rows, "Validation cases (never trained on)", args.clicks)
    print_table(train_rows, "Training cases (the shipped model saw these)", args.clicks)
    names = list(dict.fromkeys(r["model"] for r in rows))
    checks = targets(val_rows, names[0], names[-1]) if len(names) > 1 else []
    if checks:
        print("\n## Targets (validation cases)\n")
        for what, measured, met in checks:
            print(f"- [{'x' if met else ' '}] {what}: {measured}")
    if args.json:
        from medsam_plugin.io.atomic import atomic_write_json

        atomic_write_json(args.json, {"rows": rows, "targets": checks, "click_rule": CLICK_RULE})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
