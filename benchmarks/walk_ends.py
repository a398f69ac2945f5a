"""Choose a checkpoint by its 3D walks: Dice with no stop rule, with a stop policy, with a perfect stop.

Each object gets the ground-truth box on its largest slice and is walked up and down with no stop
rule (`tune_stop.record`, box+mask or the model's own mode). A stop policy only truncates a walk,
so replaying it on the recording gives what propagation with that policy returns (up to the
engine's box retry of a rejected slice). The figures per group:
- no stop: every slice the walk reached;
- policy: the walk cut where the policy would stop it (default: the model's own, `policy_for_model`);
- perfect stop: only the slices inside the true extent. Whatever is lost here is lost in the
  slices' shapes, not in where the walk ended.
It also shows how many objects end within one slice of the truth at both ends, and the mean end
error (positive: past the end). The last two lines say how the walk tapers:
- the predicted area over the true one on the object's last three slices;
- the area two slices past the end against the seed's.
A walk that carries its mask on while the object tapers shows both far above 1 and 0.

    python benchmarks/walk_ends.py --model CKPT_OR_NAME [--record walks.pkl] [--sets lesions,shared]
                                   [--policy lesion-interactive]

Lesions are the validation sarcoma patients and the stroke case (benchmarks/lesions.py); shared are
the labels of compare_modes.py (cord, BraTS, organs).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tune_stop  # noqa: E402
from compare_modes import DEFAULT_LABELS, SHARED  # noqa: E402

GROUPS = [("sarcoma CT", lambda c: "sts" in c and c.endswith("_ct")),
          ("sarcoma MR", lambda c: "sts" in c and "mrt1" in c),
          ("sarcoma all", lambda c: "sts" in c),
          ("stroke", lambda c: "isles" in c),
          ("cord + BraTS", lambda c: "brats" in c or "spinalcord" in c),
          ("organs", lambda c: "spleen" in c or "totalseg" in c)]


def kept(walk: dict, policy) -> int:
    """Slices of a recorded walk that `policy` (a StopPolicy) keeps: up to the first it rejects."""
    from medsam_plugin.engine.propagation import SliceSignals

    for k, signals in enumerate(walk["signals"]):
        if policy.rejects(SliceSignals(**signals)) is not None:
            return k
    return len(walk["z"])


def score(obj: dict, policy) -> dict:
    areas = np.array(obj["truth_areas"])
    present = np.flatnonzero(areas)
    lo, hi = int(present[0]), int(present[-1])
    out = {}
    for name in ("no stop", "policy", "perfect stop"):
        inter, area, ends = obj["seed_inter"], obj["seed_area"], {}
        for way in ("down", "up"):
            walk = obj["walks"][way]
            n = kept(walk, policy) if name == "policy" else len(walk["z"])
            last = obj["seed_z"]
            for z, a, i in list(zip(walk["z"], walk["area"], walk["inter"]))[:n]:
                if name == "perfect stop" and not lo <= z <= hi:
                    continue
                inter, area, last = inter + i, area + a, z
            ends[way] = last
        out[name] = 2.0 * inter / (area + obj["truth_total"])
        if name == "policy":
            out["errors"] = (lo - ends["down"], ends["up"] - hi)
    taper, past = [], []
    for way, end, step in (("down", lo, -1), ("up", hi, 1)):
        walk = obj["walks"][way]
        inside = [(a, t) for z, a, t in zip(walk["z"], walk["area"], walk["truth_area"]) if 0 <= (end - z) * step < 3]
        if inside:
            taper.append(sum(a for a, _ in inside) / max(1, sum(t for _, t in inside)))
        past += [a / max(1, obj["seed_area"]) for z, a in zip(walk["z"], walk["area"]) if (z - end) * step == 2]
    out["taper"], out["past"] = taper, past
    return out


def _median(values: list) -> str:
    return f"{np.median(values):.2f} (median)" if values else "none reached"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="medsam_interactive", help="registry name or checkpoint path")
    ap.add_argument("--record", default=None, help="pickle of the walks: read if present, else written")
    ap.add_argument("--sets", default="lesions,shared")
    ap.add_argument("--policy", default=None, help="a name of engine.propagation.POLICIES (default: the model's own)")
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "medsam_plugin_bench_cache"))
    args = ap.parse_args(argv)
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (the team's shared labelled volumes).")
        return 0
    from medsam_plugin.engine.propagation import POLICIES, policy_for_model
    from medsam_plugin.model.registry import load_model

    policy = POLICIES[args.policy] if args.policy else policy_for_model(load_model(args.model).spec)
    sets = args.sets.split(",")
    cases = {**(tune_stop.lesion_cases() if "lesions" in sets else {}),
             **(tune_stop.shared_cases(list(DEFAULT_LABELS)) if "shared" in sets else {})}
    path = Path(args.record) if args.record else None
    if path is not None and path.is_file():
        saved = pickle.loads(path.read_bytes())
        if saved["model"] != args.model:
            raise SystemExit(f"{path} holds walks of {saved['model']!r}, not {args.model!r}: pass another --record.")
        objects = [o for o in saved["objects"] if o["case"] in cases]
    else:
        objects = tune_stop.record(args.model, cases, args.cache_dir, None)
        if path is not None:
            path.write_bytes(pickle.dumps({"model": args.model, "mode": None, "objects": objects}))
    print(f"model {args.model}; policy {policy}")
    print("| group | n | no stop | policy | perfect stop | ends within 1 | mean end error | last 3 slices, "
          "predicted / true area | 2 past the end, area / seed's |")
    print("|---|---|---|---|---|---|---|---|---|")
    scored = [(o["case"], score(o, policy)) for o in objects]
    for name, member in GROUPS:
        rows = [r for case, r in scored if member(case)]
        if not rows:
            continue
        within = sum(max(abs(e) for e in r["errors"]) <= 1 for r in rows)
        taper = [t for r in rows for t in r["taper"]]
        past = [p for r in rows for p in r["past"]]
        print(f"| {name} | {len(rows)} | {np.mean([r['no stop'] for r in rows]):.3f} | "
              f"{np.mean([r['policy'] for r in rows]):.3f} | {np.mean([r['perfect stop'] for r in rows]):.3f} | "
              f"{within}/{len(rows)} | {np.mean([sum(r['errors']) / 2 for r in rows]):+.1f} | "
              f"{_median(taper)} | {_median(past)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
