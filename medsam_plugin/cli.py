"""The `medsam-plugin` command line: segment, evaluate, models (and finetune, see training/)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .model.defaults import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registered model name or checkpoint path (default: {DEFAULT_MODEL}); see `medsam-plugin models`")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--window", default=None,
                   help="intensity window: abdomen, lung, brain, bone, mr, or LEVEL,WIDTH (default: by modality)")
    p.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"), help="slicing axis")
    p.add_argument("--mode", default=None, help="propagation prompt mode: box, mask, box+mask, points, box+points")
    p.add_argument("--min-iou", type=float, default=None,
                   help="stop propagating when a slice overlaps the previous one less than this (default 0.5)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsam-plugin", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine decides")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a scan from a prompts file and write a label map")
    seg.add_argument("image", help="NIfTI file, DICOM folder, NRRD or MHA")
    seg.add_argument("--series-uid", default=None, help="which DICOM series to read when the folder holds several")
    seg.add_argument("--prompts", required=True, help="prompts JSON (objects with boxes/points; see README)")
    seg.add_argument("--out", required=True,
                     help="output label map (.nii.gz, .nrrd, .mha), or .dcm: a DICOM SEG (the image must be a DICOM series)")
    seg.add_argument("--dicom-seg", default=None, metavar="PATH",
                     help="also write a DICOM SEG here that references the source DICOM series (see README)")
    seg.add_argument("--seg-type", action="append", default=[], metavar="ID=TYPE",
                     help="segmented property of a label in the DICOM SEG: a DICOM CID 7151 term (Spleen, Neoplasm) "
                          "or CATEGORY/TYPE with codes SCHEME:VALUE:MEANING; repeatable (default: guessed from the name)")
    seg.add_argument("--png", default=None, help="also write a PNG overlay of the result here")
    seg.add_argument("--per-object-dir", default=None, help="also write one binary label file per object here")
    seg.add_argument("--reference", default=None, help="a ground-truth label map: print Dice per object")
    seg.add_argument("--cache-dir", default=None, help="keep slice embeddings on disk here for re-runs")
    _add_model_args(seg)

    ev = sub.add_parser("evaluate", help="simulated-expert evaluation against ground-truth labels")
    ev.add_argument("image", help="scan, or a Decathlon dataset.json to evaluate every case")
    ev.add_argument("label", nargs="?", help="ground-truth label map (not needed with a dataset.json)")
    ev.add_argument("--labels", default=None, help="comma-separated label values (default: all present)")
    ev.add_argument("--clicks", type=int, default=0, help="corrective click rounds after propagation")
    ev.add_argument("--protocol", default="box", choices=("box", "click", "box3d"),
                    help="first prompt on the slice where each label is largest: its box (default), one click at "
                         "its deepest point, or the box with the walk limited to the label's z-extent")
    ev.add_argument("--json", default=None, help="write the report here")
    ev.add_argument("--data-root", default=None, help="folder the dataset.json paths are relative to")
    ev.add_argument("--cache-dir", default=None, help="keep slice embeddings on disk here for re-runs")
    _add_model_args(ev)

    sub.add_parser("models", help="list the registered models and where their weights come from")

    from .training.cli import add_finetune_parser

    add_finetune_parser(sub)
    return parser


def _stop_rules(args):
    from .engine.propagation import StopRules

    return StopRules() if args.min_iou is None else StopRules(min_iou_with_previous=args.min_iou)


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="slice", file=sys.stderr, disable=None, leave=False)


def _check_output_folder(out: Path) -> None:
    """Fail before any model work when the result could not be written anyway."""
    import os

    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"Cannot write {out}: {folder} is not an existing folder. Create it or choose another --out.")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"Cannot write {out}: no permission to write in {folder}. Choose another --out.")


def _dicom_seg_plan(args, volume) -> tuple[list, dict]:
    """The DICOM SEG files asked for (--out *.dcm, --dicom-seg) and their --seg-type codes, checked."""
    from .io.dicom_seg import check_dicom_seg_source, is_dicom_seg_path, parse_property

    paths = [Path(p) for p in (args.out, args.dicom_seg) if p and is_dicom_seg_path(p)]
    if args.dicom_seg and not is_dicom_seg_path(args.dicom_seg):
        raise ValueError(f"--dicom-seg {args.dicom_seg}: a DICOM SEG file name must end in .dcm.")
    properties = {}
    for spec in args.seg_type:
        label, sep, text = spec.partition("=")
        if not sep or not label.strip().isdigit():
            raise ValueError(f"--seg-type {spec!r}: write LABEL_ID=TYPE, e.g. --seg-type 1=Spleen.")
        properties[int(label)] = parse_property(text)
    if paths:
        check_dicom_seg_source(volume)
    elif properties:
        raise ValueError("--seg-type only applies to a DICOM SEG output: add --dicom-seg PATH.dcm or --out PATH.dcm.")
    return paths, properties


def _model_label(session) -> str:
    """The model's registry name (a checkpoint path is reduced to its file name: no local paths in a SEG)."""
    spec = getattr(session.predictor, "spec", None)
    name = getattr(spec, "name", None) or str(session.model_name)
    return Path(name).name if ("/" in name or "\\" in name) else name


def _save_outputs(session, out: Path, seg_paths: list, seg_properties: dict, per_object_dir) -> list:
    """Write the label map (or DICOM SEG) at --out, any --dicom-seg, and the per-object files."""
    from .io.dicom_seg import is_dicom_seg_path, write_dicom_seg
    from .io.writers import write_label_maps_per_object

    names = session.labels.names()
    colors = {k: o.color for k, o in session.labels.objects.items()}
    labels_ijk = session.labels_ijk()
    written = [] if is_dicom_seg_path(out) else [session.save(out)[0]]
    for path in seg_paths:
        written.append(write_dicom_seg(path, labels_ijk, session.volume, names=names, colors=colors,
                                       properties=seg_properties, model_name=_model_label(session)))
    if per_object_dir is not None:
        written += list(write_label_maps_per_object(per_object_dir, labels_ijk, session.volume,
                                                    names=names, colors=colors).values())
    return written


def cmd_segment(args) -> int:
    from .engine.prompts import load_prompts, parse_prompts
    from .engine.propagation import run_to_completion
    from .engine.session import SegmentationSession
    from .io import read_labels, read_volume

    volume = read_volume(args.image, series_uid=args.series_uid)
    seg_paths, seg_properties = _dicom_seg_plan(args, volume)  # fails here, before any model work
    session = SegmentationSession(volume, model=args.model, device=args.device, axis=args.axis,
                                  window=args.window, cache_dir=args.cache_dir)
    objects = parse_prompts(load_prompts(args.prompts), session.view, source=str(args.prompts))
    if args.mode:
        session.mode = args.mode
    session.stop_rules = _stop_rules(args)
    out = Path(args.out)
    for p in (out, *seg_paths):
        _check_output_folder(p)
    predictor = session.predictor  # load the model before the progress bars start
    logging.getLogger(__name__).info("model %s on %s", predictor.spec.name, predictor.device)
    for obj in objects:
        session.add_object(name=obj.name, label_id=obj.label_id)
        for sp in obj.slices.values():
            session.segment_slice(obj.label_id, sp.z, points_yx=sp.points_yx or None,
                                  point_labels=sp.point_labels or None, box_xyxy=sp.box_xyxy)
        if obj.direction != "none":
            bar = _progress_bar(session.shape_zyx[0], f"{obj.name}")

            def show(progress, bar=bar):
                bar.total, bar.n = progress.total, progress.done
                bar.refresh()

            result = run_to_completion(session.propagate(obj.label_id, direction=obj.direction), callback=show)
            bar.close()
            print(f"{obj.name} (label {obj.label_id}): slices {min(result.slices)}-{max(result.slices)} "
                  f"({len(result.slices)} slices); stopped: "
                  + "; ".join(f"{k}: {v}" for k, v in result.stopped.items()), file=sys.stderr)
    written = _save_outputs(session, out, seg_paths, seg_properties, args.per_object_dir)
    for path in written:
        print(f"wrote {path}")
    if args.png:
        from .io.overlay import save_overlay_png

        png = save_overlay_png(args.png, session.image_u8, session.labels.array, session.labels.objects,
                               spacing_zyx=session.view.view_spacing)
        print(f"wrote {png}")
    if args.reference:
        from .evaluation.metrics import dice

        truth = read_labels(args.reference, volume)
        labels_ijk = session.labels_ijk()
        for obj in objects:
            print(f"Dice {obj.name} (label {obj.label_id}) vs reference: "
                  f"{dice(labels_ijk == obj.label_id, truth == obj.label_id):.3f}")
    return 0


def _print_table(report: dict) -> None:
    print(f"\n{Path(report['image']).parent.name or report['image']}  (model {report['model']}, mode "
          f"{report['mode']}, protocol {report.get('protocol', 'box')}, clicks {report['clicks']})")
    # dice/nsd: the object in the label map (an earlier object keeps the voxels it claimed first);
    # own: the object's own result before those claims (equal unless objects overlap).
    print(f"{'label':>6} {'name':<24} {'seed':>6} {'dice':>6} {'nsd':>6} {'dice own':>8} {'nsd own':>7} "
          f"{'pred/true slices':>17} {'span (ends)':>16} {'sec':>6}")
    for o in report["objects"]:
        span = o.get("span") or {}
        ends = (f"{span['pred_range'][0]}-{span['pred_range'][1]} {span['overshoot_low']:+d}/{span['overshoot_high']:+d}"
                if span.get("overshoot_low") is not None else "-")
        print(f"{o['label']:>6} {o['name'][:24]:<24} {o['seed_dice']:6.3f} {o['dice']:6.3f} {o['nsd']:6.3f} "
              f"{o['dice_own']:8.3f} {o['nsd_own']:7.3f} {o['slices_predicted']:>8}/{o['slices_truth']:<8} "
              f"{ends:>16} {o['seconds']:6.1f}")
        if len(o["dice_per_round"]) > 1:
            print(f"{'':>6} {'dice per round':<24} " + " -> ".join(f"{d:.3f}" for d in o["dice_per_round"])
                  + f"  (AUC {o['dsc_auc']:.3f}, NSD AUC {o['nsd_auc']:.3f})")
    print(f"{'mean':>6} {'':<24} {report['mean_seed_dice']:6.3f} {report['mean_dice']:6.3f} {report['mean_nsd']:6.3f} "
          f"{report['mean_dice_own']:8.3f} {report['mean_nsd_own']:7.3f}")


def cmd_evaluate(args) -> int:
    from .evaluation.run import datalist_cases, evaluate_case
    from .model.registry import load_model

    labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    if args.image.endswith(".json"):
        cases = datalist_cases(args.image, args.data_root)
    else:
        if not args.label:
            raise ValueError("evaluate needs IMAGE and LABEL, or a dataset.json.")
        cases = [{"image": args.image, "label": args.label}]
    loaded = load_model(args.model, device=args.device)
    reports = []
    for case in cases:
        report = evaluate_case(case["image"], case["label"], labels=labels, clicks=args.clicks, mode=args.mode,
                               axis=args.axis, window=args.window, loaded_model=loaded, stop=_stop_rules(args),
                               cache_dir=args.cache_dir, protocol=args.protocol)
        _print_table(report)
        reports.append(report)
    out = reports[0] if len(reports) == 1 else {
        "cases": reports, "mean_dice": sum(r["mean_dice"] for r in reports) / len(reports),
        "mean_dice_own": sum(r["mean_dice_own"] for r in reports) / len(reports)}
    if args.json:
        from .io.atomic import atomic_write_json

        atomic_write_json(args.json, out)  # strict JSON: a NaN score is written as null
        print(f"wrote {args.json}")
    return 0


def cmd_models(args) -> int:
    from .model.registry import DEFAULT_MODEL, list_models

    for spec in list_models():
        default = "  (default)" if spec.name == DEFAULT_MODEL else ""
        print(f"{spec.name}{default}\n    {spec.description}\n    input {spec.image_size}px, "
              f"normalisation {spec.normalization}\n    weights: {spec.source}")
    return 0


def _user_errors() -> tuple:
    """Exceptions whose message is a sentence for the user: printed without a traceback."""
    from .engine.propagation import PropagationCancelled
    from .io import ImageReadError, LabelWriteError
    from .model.errors import DeviceNotAvailableError, ModelLoadError

    return (ImageReadError, LabelWriteError, ModelLoadError, DeviceNotAvailableError, PropagationCancelled,
            ValueError, KeyError, IndexError, FileNotFoundError, PermissionError)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"segment": cmd_segment, "evaluate": cmd_evaluate, "models": cmd_models}
    if args.command == "finetune":
        from .training.cli import cmd_finetune

        handlers["finetune"] = cmd_finetune
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("cancelled: nothing was written.", file=sys.stderr)
        return EXIT_CANCELLED
    except _user_errors() as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
