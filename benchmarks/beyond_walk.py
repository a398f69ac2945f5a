"""A/B of the session's answer to a foreground click on a slice a walk never reached
(`SegmentationSession._answer_beyond_walk`) against answering the clicks alone, as before:
5 corrective clicks after one box and after one click, on lesions whose walks stop short.

    python benchmarks/beyond_walk.py [--model medsam_interactive] [--cases id,...] [--json out.json]
Needs ../shared/lesions (skips with a message where it is absent).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesions import SHARED, case_sets, run  # noqa: E402

# Validation-patient volumes where medsam_interactive v1's one-box walk stopped 5+ slices short.
DEFAULT_CASES = "ibsi_sts_006_ct,ibsi_sts_006_mrt1,ibsi_sts_008_ct,ibsi_sts_008_mrt1,ibsi_sts_022_ct,ibsi_sts_011_mrt1"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="medsam_interactive")
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "medsam_plugin_bench_cache"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not (SHARED / "lesions").is_dir():
        print(f"skipped: {SHARED / 'lesions'} is absent (the team's shared lesion volumes).")
        return 0
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import read_labels, read_volume
    from medsam_plugin.model.registry import load_model

    loaded = load_model(args.model)
    wanted = args.cases.split(",")
    cases = [c for c in case_sets(["sarcoma", "stroke"]) if c["case"] in wanted]
    nearest = SegmentationSession._nearest_result
    rows = []
    for case in cases:
        volume = read_volume(case["image"])
        truth = read_labels(case["label"], volume)
        for protocol in ("box", "click"):
            row = {"case": case["case"], "protocol": protocol}
            for variant in ("clicks alone", "as the walk asks"):
                SegmentationSession._nearest_result = (lambda self, l, z: None) if variant == "clicks alone" else nearest
                row[variant] = run(loaded, volume, truth, 1, protocol, args.clicks, args.cache_dir)["dice_per_round"]
            SegmentationSession._nearest_result = nearest
            rows.append(row)
            print(f"{case['case']:22s} {protocol:5s} clicks alone: " + " ".join(f"{d:.3f}" for d in row["clicks alone"])
                  + " | as the walk asks: " + " ".join(f"{d:.3f}" for d in row["as the walk asks"]), flush=True)
    for protocol in ("box", "click"):
        mine = [r for r in rows if r["protocol"] == protocol]
        for variant in ("clicks alone", "as the walk asks"):
            pad = np.array([(r[variant] + [r[variant][-1]] * args.clicks)[:args.clicks + 1] for r in mine])
            worst = float(np.min(np.diff(pad, axis=1)))
            print(f"mean after the {protocol}, {variant}: " + " ".join(f"{v:.3f}" for v in pad.mean(axis=0))
                  + f" (worst round {worst:+.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
