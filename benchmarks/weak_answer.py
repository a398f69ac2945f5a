"""When is a slice answer weak? Predicted IoU against true Dice on seed slices, threshold by leave-one-patient-out.

Protocol: for every object of the shared cases (../shared/data, the labels of compare_modes.py)
and of the lesion set (../shared/lesions, label 1), three seed slices: the one where the object is
largest and those at a quarter and three quarters of its z extent. On each, two prompts a user
gives first: one foreground click at the slice mask's deepest point, and the ground-truth box
(padded 2 px). Each is answered as the widget's S answers it (`SegmentationSession.segment_slice`,
the default model, its click refinement included), and the answer's predicted IoU and its true 2D
Dice are recorded.

An answer is *weak* when its true Dice is under `--weak-dice` (default 0.7: below it a user has to
correct the slice before propagating it). The flag "the model is unsure" fires when the predicted
IoU is under a threshold t. t is chosen to maximise Youden's J (sensitivity + specificity - 1 for
weak answers) over a grid; leave-one-patient-out (a patient's CT and MR, or a case of the shared
set, held out together): for each patient, t is chosen on the others and applied to its answers;
the pooled held-out confusion is what a new patient's answers can expect. The constant the widget
uses (`engine.session.WEAK_ANSWER_IOU`) is the t chosen on all patients; the held-out thresholds'
range says how stable it is.

    python benchmarks/weak_answer.py [--record /tmp/weak_record.jsonl] [--json out.json] [--limit N]
                                     [--held-out recipes/lesion_datalist.json]

`--record` keeps the answers as they come: a second run with the same file asks the model only
about the objects not in it yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_modes import DEFAULT_LABELS, SHARED  # noqa: E402

LESIONS = SHARED.parent / "lesions"
GRID = np.round(np.arange(0.30, 0.951, 0.01), 2)


def objects(held_out: Path | None = None):
    """(case folder, label, patient) of every object measured; with `held_out` (a training
    datalist), only those of cases and patients it does not train on (a threshold for a model is
    chosen on answers it has not learned from)."""
    out = [(SHARED / case, label, case) for case, labels in DEFAULT_LABELS.items() for label in labels]
    manifest = json.loads((LESIONS / "manifest.json").read_text())["cases"]
    out += [(LESIONS / c["id"], 1, c["patient"]) for c in manifest]
    if held_out is not None:
        trained = {c["name"] for c in json.loads(Path(held_out).read_text())["training"]}
        patients = {c["patient"] for c in manifest if c["id"] in trained}
        out = [o for o in out if o[0].name not in trained and o[2] not in patients]
    return [o for o in out if (o[0] / "image.nii.gz").is_file()]


def seed_slices(truth_zyx: np.ndarray) -> list[int]:
    areas = truth_zyx.sum(axis=(1, 2))
    zs = np.nonzero(areas)[0]
    lo, hi = int(zs.min()), int(zs.max())
    picks = [int(np.argmax(areas)), lo + (hi - lo) // 4, lo + 3 * (hi - lo) // 4]
    return [z for z in dict.fromkeys(picks) if areas[z] > 0]


def deepest_point(mask_yx: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(np.pad(mask_yx, 1))[1:-1, 1:-1]
    deepest = np.argwhere(depth == depth.max())
    y, x = deepest[int(np.argmin(((deepest - deepest.mean(axis=0)) ** 2).sum(axis=1)))]
    return np.array([[float(y), float(x)]])


def record(model: str, limit: int | None, cache_dir: str | None, keep: Path | None = None,
           held_out: Path | None = None) -> list[dict]:
    """Answer every object's seed slices; with `keep`, each object's answers are appended to that
    JSON-lines file as they come, and objects already there are not asked again."""
    import torch

    from medsam_plugin.engine.propagation import bounding_box_xyxy
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.evaluation.metrics import dice
    from medsam_plugin.io import read_labels, read_volume
    from medsam_plugin.model.registry import load_model

    torch.set_num_threads(1)
    loaded = load_model(model, device="cpu")
    rows = []
    done = set()
    if keep is not None and keep.is_file():
        rows = [json.loads(line) for line in keep.read_text().splitlines() if line.strip()]
        done = {(r["case"], r["label"]) for r in rows}
    for folder, label, patient in objects(held_out)[:limit]:
        if (folder.name, label) in done:
            continue
        t0 = time.perf_counter()
        first = len(rows)
        volume = read_volume(folder / "image.nii.gz")
        session = SegmentationSession(volume, loaded_model=loaded, cache_dir=cache_dir)
        truth = session.view.to_view(read_labels(folder / "label.nii.gz", volume)) == label
        obj = session.add_object("o").label_id
        for z in seed_slices(truth):
            ny, nx = truth.shape[1:]
            x0, y0, x1, y1 = bounding_box_xyxy(truth[z])
            box = np.array([max(0, x0 - 2), max(0, y0 - 2), min(nx - 1, x1 + 2), min(ny - 1, y1 + 2)], np.float32)
            for kind, kwargs in (("click", dict(points_yx=deepest_point(truth[z]), point_labels=np.array([1]))),
                                 ("box", dict(box_xyxy=box))):
                pred = session.segment_slice(obj, z, commit=False, **kwargs)
                rows.append({"case": folder.name, "label": label, "patient": patient, "z": z, "prompt": kind,
                             "area": int(truth[z].sum()), "predicted_iou": float(pred.iou),
                             "dice": float(dice(pred.mask_yx, truth[z]))})
        if keep is not None:
            with keep.open("a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows[first:])
        print(f"{folder.name} label {label}: {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


def youden(iou: np.ndarray, weak: np.ndarray, t: float) -> float:
    flagged = iou < t
    sens = (flagged & weak).sum() / max(1, weak.sum())
    spec = (~flagged & ~weak).sum() / max(1, (~weak).sum())
    return float(sens + spec - 1)


def choose(iou: np.ndarray, weak: np.ndarray) -> float:
    scores = [youden(iou, weak, t) for t in GRID]
    best = max(scores)
    # among equally good thresholds, the lowest: flag no more answers than the data asks for
    return float(GRID[scores.index(best)])


def analyse(rows: list[dict], weak_dice: float, prompts=("click", "box")) -> dict:
    rows = [r for r in rows if r["prompt"] in prompts]
    iou = np.array([r["predicted_iou"] for r in rows])
    d = np.array([r["dice"] for r in rows])
    weak = d < weak_dice
    patients = np.array([r["patient"] for r in rows])
    held = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    chosen = []
    for p in sorted(set(patients)):
        train, test = patients != p, patients == p
        t = choose(iou[train], weak[train])
        chosen.append(t)
        flagged = iou[test] < t
        held["tp"] += int((flagged & weak[test]).sum())
        held["fp"] += int((flagged & ~weak[test]).sum())
        held["tn"] += int((~flagged & ~weak[test]).sum())
        held["fn"] += int((~flagged & weak[test]).sum())
    t_all = choose(iou, weak)
    from scipy.stats import spearmanr

    return {
        "prompts": list(prompts), "answers": len(rows), "patients": len(set(patients)), "weak": int(weak.sum()),
        "weak_dice": weak_dice, "spearman_iou_dice": float(spearmanr(iou, d).statistic),
        "threshold_all": t_all, "youden_all": youden(iou, weak, t_all),
        "held_out_thresholds": [min(chosen), float(np.median(chosen)), max(chosen)],
        "held_out": held,
        "held_out_sensitivity": held["tp"] / max(1, held["tp"] + held["fn"]),
        "held_out_specificity": held["tn"] / max(1, held["tn"] + held["fp"]),
        "held_out_precision": held["tp"] / max(1, held["tp"] + held["fp"]),
        "mean_dice_flagged": float(d[iou < t_all].mean()) if (iou < t_all).any() else None,
        "mean_dice_not_flagged": float(d[iou >= t_all].mean()) if (iou >= t_all).any() else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="medsam_interactive")
    ap.add_argument("--record", default=None, help="JSON-lines file of recorded answers (reused and extended)")
    ap.add_argument("--cache-dir", default=None, help="on-disk embedding cache")
    ap.add_argument("--weak-dice", type=float, default=0.7)
    ap.add_argument("--limit", type=int, default=None, help="only the first N objects (a quick check)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--analyse-only", action="store_true", help="only analyse the answers in --record")
    ap.add_argument("--held-out", default=None, metavar="DATALIST",
                    help="only the objects this training datalist does not train on (its cases and their patients), "
                         "e.g. recipes/lesion_datalist.json for the shipped medsam_interactive")
    args = ap.parse_args(argv)
    if args.analyse_only:
        rows = [json.loads(line) for line in Path(args.record).read_text().splitlines() if line.strip()]
    else:
        rows = record(args.model, args.limit, args.cache_dir, Path(args.record) if args.record else None,
                      Path(args.held_out) if args.held_out else None)
    out = {name: analyse(rows, args.weak_dice, prompts)
           for name, prompts in (("all", ("click", "box")), ("click", ("click",)), ("box", ("box",)))}
    for name, res in out.items():
        h = res["held_out"]
        print(f"{name:5s}: {res['answers']} answers, {res['patients']} patients, {res['weak']} weak (Dice < "
              f"{res['weak_dice']}); Spearman(pred IoU, Dice) {res['spearman_iou_dice']:.2f}; t on all "
              f"{res['threshold_all']:.2f} (J {res['youden_all']:.2f}); held-out t min/median/max "
              f"{res['held_out_thresholds']}; held-out sens {res['held_out_sensitivity']:.2f} spec "
              f"{res['held_out_specificity']:.2f} prec {res['held_out_precision']:.2f} "
              f"(tp {h['tp']} fp {h['fp']} tn {h['tn']} fn {h['fn']}); mean Dice flagged "
              f"{res['mean_dice_flagged']}, not flagged {res['mean_dice_not_flagged']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "results": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
