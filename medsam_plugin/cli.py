"""The `medsam-plugin` command line: segment, evaluate, models (and finetune, see training/)."""

from __future__ import annotations

import argparse
import os
import json
import logging
import pickle
import signal
import sys
from pathlib import Path

from .views import VIEWS

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .model.defaults import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registered model name or checkpoint path (default: {DEFAULT_MODEL}); see `medsam-plugin models`")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--window", default=None,
                   help="intensity window: abdomen, lung, brain, bone, mr, or LEVEL,WIDTH (default: by modality)")
    p.add_argument("--axis", default="axial", choices=VIEWS, help="slicing axis")
    p.add_argument("--mode", default=None, help="propagation prompt mode: box, mask, box+mask, points, box+points")
    p.add_argument("--min-iou", type=float, default=None,
                   help="stop propagating when a slice overlaps the previous one less than this (default 0.5)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsam-plugin", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine decides")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a scan from a prompts file and write a label map")
    seg.add_argument("image", nargs="?", help="NIfTI file, DICOM folder, NRRD or MHA")
    seg.add_argument("--series-uid", default=None, help="which DICOM series to read when the folder holds several")
    seg.add_argument("--prompts", default=None, help="prompts JSON (objects with boxes/points; see README)")
    seg.add_argument("--out", default=None,
                     help="output label map (.nii.gz, .nrrd, .mha), or .dcm: a DICOM SEG (the image must be a DICOM series)")
    seg.add_argument("--datalist", default=None, metavar="DATASET.json",
                     help="segment every case of this dataset.json that has saved prompts (labelsTr/<case>.prompts.json); "
                          "instead of IMAGE --prompts --out; runs sharded under torchrun")
    seg.add_argument("--out-dir", default=None, help="with --datalist: where the label maps go (default DATASET/replayed)")
    seg.add_argument("--json", default=None, help="with --datalist: write the per-case results here")
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


def _same_file(a: Path, b: Path) -> bool:
    """True when two paths name one file (also through links, `..` or a hard link)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.abspath(a) == os.path.abspath(b)


def _is_a_slice_of(out: Path, folder: Path) -> bool:
    """True when `out` is an existing DICOM image file inside the input DICOM folder (overwriting it
    would destroy a slice of the scan; an earlier DICOM SEG there may be replaced)."""
    if not (folder.is_dir() and out.is_file()):
        return False
    try:
        Path(os.path.realpath(out)).relative_to(os.path.realpath(folder))
        with open(out, "rb") as fh:
            is_dicom = fh.read(132)[128:132] == b"DICM"
    except (ValueError, OSError):
        return False
    from .io.dicom_seg import is_dicom_seg

    return is_dicom and not is_dicom_seg(out)


def _check_not_an_input(outputs: dict, inputs: dict) -> None:
    """Refuse an output that would overwrite an input (the scan, the prompts, a reference...)."""
    for out_what, out in outputs.items():
        for in_what, src in inputs.items():
            if src is None:
                continue
            if _same_file(out, src) or _is_a_slice_of(out, src):
                relation = "the same file as" if _same_file(out, src) else "a slice (the same file as a part) of"
                raise ValueError(f"{out_what} {out} is {relation} the {in_what} {src}: writing there would "
                                 f"destroy it. Choose another output path. Nothing was written.")


def _check_new_file(what: str, path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name inside it. Nothing was written.")
    _check_output_folder(path)


def _check_segment_args(args) -> dict:
    """Validate every argument and output path of `segment` before any reading or model work.
    Returns {what: path} of the outputs."""
    from .engine.propagation import PROMPT_MODES
    from .engine.preprocessing import parse_window
    from .io.dicom_seg import is_dicom_seg_path
    from .io.writers import MAX_FILE_NAME_BYTES, _label_format, sidecar_paths

    if args.mode is not None and args.mode not in PROMPT_MODES:
        raise ValueError(f"--mode {args.mode!r} is not a propagation mode; use one of {', '.join(PROMPT_MODES)}.")
    if args.window is not None:
        parse_window(args.window)
    if args.min_iou is not None and not 0.0 <= args.min_iou <= 1.0:
        raise ValueError(f"--min-iou {args.min_iou} must be a number from 0 to 1.")
    from .engine.prompts import load_prompts

    prompts = Path(args.prompts)
    load_prompts(prompts)  # a missing, folder or non-JSON prompts file fails here, before any model work
    if args.reference and not Path(args.reference).exists():
        raise ValueError(f"The reference label map {args.reference} does not exist. Check the path.")
    out = Path(args.out)
    outputs = {"--out": out}
    if not is_dicom_seg_path(out):
        for key, side in sidecar_paths(out).items():
            outputs[f"the --out {key} sidecar"] = side
    if args.dicom_seg:
        outputs["--dicom-seg"] = Path(args.dicom_seg)
    if args.png:
        outputs["--png"] = Path(args.png)
    inputs = {"input image": Path(args.image), "prompts file": prompts,
              "reference label map": Path(args.reference) if args.reference else None,
              "model file": Path(args.model) if Path(args.model).is_file() else None}
    _check_not_an_input(outputs, inputs)  # first: the one mistake that would destroy data
    if not is_dicom_seg_path(out):
        _label_format(out)  # raises for an unknown extension
    if args.png and Path(args.png).suffix.lower() != ".png":
        raise ValueError(f"--png {args.png}: the overlay file name must end in .png.")
    for what, path in outputs.items():
        if len(path.name.encode("utf-8", "surrogateescape")) > MAX_FILE_NAME_BYTES:
            raise ValueError(f"{what} {path}: the file name is longer than {MAX_FILE_NAME_BYTES} bytes; choose a "
                             f"shorter one.")
        _check_new_file(what, path)
    if args.per_object_dir:
        folder = Path(args.per_object_dir)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--per-object-dir {folder} is a file, not a folder. Choose a folder (it is created "
                             f"when missing). Nothing was written.")
        if not folder.exists():
            _check_output_folder(folder)
        outputs["--per-object-dir"] = folder
    paths = list(outputs.values())
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            if _same_file(a, b):
                raise ValueError(f"Two outputs are the same file, {a}: give each output its own path.")
    return outputs


def _warn_if_constant(volume) -> None:
    import numpy as np

    data = volume.data_ijk
    if data.size and np.min(data) == np.max(data):
        print(f"warning: every voxel of {volume.source_path} has the value {np.min(data).item()!r}: the image "
              f"holds nothing to segment, and the result will not mean anything. Check the file.", file=sys.stderr)


def _check_irregular_slices(args, volume) -> None:
    """A DICOM series whose slices are unevenly spaced (a missing slice) or tilted is read with one
    slice spacing, right slice by slice but wrong in millimetres between slices (`io.readers.
    _irregular_slices`). Refuse whatever would carry that into a result (a label map's affine, world
    coordinates in the prompts); a DICOM SEG, which takes each frame's position from its own slice,
    is written as acquired."""
    from .engine.prompts import load_prompts
    from .io.dicom_seg import is_dicom_seg_path
    from .io.readers import IRREGULAR_SLICES

    why = volume.extra.get(IRREGULAR_SLICES)
    if not why:
        return
    maps = [f"--out {args.out}"] if not is_dicom_seg_path(args.out) else []
    if args.per_object_dir:
        maps.append(f"--per-object-dir {args.per_object_dir}")
    frame = str(load_prompts(args.prompts).get("frame", "voxel"))
    if maps:
        raise ValueError(f"The DICOM series '{args.image}': {why}. A label map ({', '.join(maps)}) has one slice "
                         f"spacing and would carry that error; write a DICOM SEG instead (--out seg.dcm, placed on "
                         f"each acquired slice), or export the series again with every slice. Nothing was written.")
    if frame != "voxel":
        raise ValueError(f"The DICOM series '{args.image}': {why}, so {frame} coordinates in the prompts cannot be "
                         f"placed on a slice reliably; give the prompts in the voxel frame (\"frame\": \"voxel\"). "
                         f"Nothing was written.")
    print(f"note: the DICOM series '{args.image}': {why}; the DICOM SEG takes each frame's position from its own "
          f"slice, so it is written as acquired.", file=sys.stderr)


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
    """Write the label map (or DICOM SEG) at --out, any --dicom-seg, and the per-object files.

    The label map, its sidecars and the per-object files are one unit (`write_planned`: all
    temporary, fsynced, then renamed); a DICOM SEG follows. A failure names what was written.
    """
    from .io import LabelWriteError
    from .io.dicom_seg import is_dicom_seg_path, write_dicom_seg
    from .io.writers import plan_label_map, plan_label_maps_per_object, write_planned

    names = session.labels.names()
    colors = {k: o.color for k, o in session.labels.objects.items()}
    labels_ijk = session.labels_ijk()
    items = [] if is_dicom_seg_path(out) else plan_label_map(out, labels_ijk, session.volume, names, colors)
    if per_object_dir is not None:
        for planned in plan_label_maps_per_object(per_object_dir, labels_ijk, session.volume, names=names,
                                                  colors=colors).values():
            items += planned
    written = write_planned(items) if items else []
    for path in seg_paths:
        try:
            written.append(write_dicom_seg(path, labels_ijk, session.volume, names=names, colors=colors,
                                           properties=seg_properties, model_name=_model_label(session)))
        except LabelWriteError as exc:
            done = ", ".join(str(p) for p in written) or "nothing"
            raise LabelWriteError(f"{exc} (Already written: {done}.)") from exc
    return written


def cmd_segment(args) -> int:
    if args.datalist:
        if args.image or args.prompts or args.out:
            raise ValueError("segment takes either --datalist DATASET.json or IMAGE --prompts P --out OUT, not both.")
        from .dataset.batch import cmd_segment_datalist

        return cmd_segment_datalist(args)
    if not (args.image and args.prompts and args.out):
        raise ValueError("segment needs IMAGE, --prompts and --out (or --datalist DATASET.json for a whole dataset).")
    from .engine.choice import ModelChoice
    from .engine.prompts import load_prompts, parse_prompts
    from .engine.propagation import run_to_completion
    from .io import read_labels, read_volume

    outputs = _check_segment_args(args)  # every argument and output path, before reading anything
    from .io.atomic import recover_interrupted_sets

    for folder in {p.parent for p in outputs.values()}:
        for path in recover_interrupted_sets(folder):  # an earlier run killed between its renames
            print(f"completed {path}, which an interrupted earlier run had left half-renamed", file=sys.stderr)
    volume = read_volume(args.image, series_uid=args.series_uid)
    _warn_if_constant(volume)
    _check_irregular_slices(args, volume)
    seg_paths, seg_properties = _dicom_seg_plan(args, volume)  # fails here, before any model work
    session = ModelChoice.from_args(args).session(volume)
    doc = load_prompts(args.prompts)
    objects = parse_prompts(doc, session.view, source=str(args.prompts))
    from .dataset.replay import edits_of_document, read_edits

    edits_path = edits_of_document(doc, args.prompts)  # brush edits saved with the prompts (Dataset panel)
    edits = read_edits(edits_path, volume.data_ijk.shape) if edits_path else {}
    if args.mode:
        session.mode = args.mode
    session.stop_rules = _stop_rules(args)
    out = Path(args.out)
    for p in (out, *seg_paths):
        _check_output_folder(p)
    truth = read_labels(args.reference, volume) if args.reference else None  # a misfit fails before the model
    def announce(progress):  # a slow one-time step (the first OpenVINO conversion) is never silent
        if progress.kind == "prepare" and progress.done:
            print(progress.message, file=sys.stderr, flush=True)

    predictor = run_to_completion(session.prepare(), callback=announce)  # before the progress bars start
    logging.getLogger(__name__).info("model %s on %s", predictor.spec.name, predictor.device)
    withheld: dict[int, dict[int, int]] = {}  # object -> other object -> voxels the overlap rule kept from it

    def tally(label_id):
        for other, count in session.withheld.items():
            withheld.setdefault(label_id, {})[other] = withheld.get(label_id, {}).get(other, 0) + count

    for obj in objects:
        session.add_object(name=obj.name, label_id=obj.label_id)
        for sp in obj.slices.values():
            session.segment_slice(obj.label_id, sp.z, points_yx=sp.points_yx or None,
                                  point_labels=sp.point_labels or None, box_xyxy=sp.box_xyxy)
            if obj.direction == "none":  # else the propagation's commit counts every slice, seeds included
                tally(obj.label_id)
        if obj.direction != "none":
            bar = _progress_bar(session.shape_zyx[0], f"{obj.name}")

            def show(progress, bar=bar):
                bar.total, bar.n = progress.total, progress.done
                bar.refresh()

            result = run_to_completion(session.propagate(obj.label_id, direction=obj.direction), callback=show)
            bar.close()
            tally(obj.label_id)
            print(f"{obj.name} (label {obj.label_id}): slices {min(result.slices)}-{max(result.slices)} "
                  f"({len(result.slices)} slices); stopped: "
                  + "; ".join(f"{k}: {v}" for k, v in result.stopped.items()), file=sys.stderr)
            unsure = sorted((c, z) for z, c in getattr(result, "confidence", {}).items() if c < 0.5)[:5]
            if unsure:  # where a reviewer should look first
                print("  least sure slices (confidence < 0.5): "
                      + ", ".join(f"{z} ({c:.2f})" for c, z in unsure), file=sys.stderr)
    if edits:
        from .dataset.batch import put_back_edits

        put_back_edits(session, edits)
    _report_withheld(session, objects, withheld)
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

        labels_ijk = session.labels_ijk()
        for obj in objects:
            print(f"Dice {obj.name} (label {obj.label_id}) vs reference: "
                  f"{dice(labels_ijk == obj.label_id, truth == obj.label_id):.3f}")
    return 0


def _report_withheld(session, objects, withheld: dict, shown: int = 10) -> None:
    """Say which objects lost voxels to earlier ones under the overlap rule ("none": a voxel stays with
    the object that claimed it first), as the widget does after each commit; the objects left with
    no voxel at all first. At most `shown` objects are named per kind, then a count of the rest."""
    if not withheld:
        return
    objs = session.labels.objects
    counts = session.volumes_ml()

    def name(label_id):
        return f"'{objs[label_id].name}' (label {label_id})" if label_id in objs else f"label {label_id}"

    def lost(label_id):
        by = sorted(withheld[label_id], key=lambda k: -withheld[label_id][k])
        return (f"{sum(withheld[label_id].values()):,} voxels to " + ", ".join(name(k) for k in by[:3])
                + (f" and {len(by) - 3} more" if len(by) > 3 else ""))

    order = [o.label_id for o in objects if withheld.get(o.label_id)]
    empty = [k for k in order if not counts.get(k)]
    partial = [k for k in order if counts.get(k)]
    total = len(objects)
    if empty:
        print(f"warning: {len(empty)} of {total} objects got no voxel, because objects before them in the prompts "
              f"file hold all of their result (overlap 'none': the first claim wins): "
              + "; ".join(f"{name(k)} lost {lost(k)}" for k in empty[:shown])
              + (f"; and {len(empty) - shown} more" if len(empty) > shown else "")
              + ". Their files and maps hold nothing for them: prompt them where no earlier object is, or "
                "list them first.", file=sys.stderr)
    if partial:
        print(f"note: {len(partial)} of {total} objects lost voxels to objects before them (overlap 'none'): "
              + "; ".join(f"{name(k)} lost {lost(k)}" for k in partial[:shown])
              + (f"; and {len(partial) - shown} more" if len(partial) > shown else "") + ".", file=sys.stderr)


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
    from .engine.choice import ModelChoice
    from .evaluation.run import datalist_cases, evaluate_case
    from .evaluation.simulate import ExpertSettings

    from .engine.preprocessing import parse_window
    from .engine.propagation import PROMPT_MODES

    try:
        labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    except ValueError:
        raise ValueError(f"--labels {args.labels!r}: give label values as integers separated by commas, "
                         f"e.g. --labels 1,2.") from None
    if args.mode is not None and args.mode not in PROMPT_MODES:
        raise ValueError(f"--mode {args.mode!r} is not a propagation mode; use one of {', '.join(PROMPT_MODES)}.")
    if args.window is not None:
        parse_window(args.window)
    if args.clicks < 0:
        raise ValueError(f"--clicks {args.clicks} must be 0 or more.")
    if args.json:  # checked before the model runs, not after
        if not Path(args.json).name.lower().endswith(".json"):
            raise ValueError(f"--json {args.json}: the report file name must end in .json.")
        _check_new_file("--json", Path(args.json))
        _check_not_an_input({"--json": Path(args.json)},
                            {"input": Path(args.image), "label map": Path(args.label) if args.label else None})
    if args.image.endswith(".json"):
        check_datalist(args.image)
        cases = datalist_cases(args.image, args.data_root)
    else:
        if not args.label:
            raise ValueError("evaluate needs IMAGE and LABEL, or a dataset.json.")
        cases = [{"image": args.image, "label": args.label}]
    choice = ModelChoice.from_args(args)
    expert = ExpertSettings(clicks=args.clicks, mode=args.mode, stop=_stop_rules(args), protocol=args.protocol)
    loaded = choice.load()
    from .model.fast import make_encoder, pending_conversion_s

    if pending_conversion_s(loaded) is not None:  # the first OpenVINO conversion, said aloud; cached for the cases
        make_encoder(loaded, on_progress=lambda message, _: print(message, file=sys.stderr, flush=True))
    reports = []
    for case in cases:
        report = evaluate_case(case["image"], case["label"], choice, expert, labels=labels, loaded_model=loaded)
        _print_table(report)
        reports.append(report)
    out = reports[0] if len(reports) == 1 else {
        "cases": reports, "mean_dice": _mean_of_cases(reports, "mean_dice"),
        "mean_dice_own": _mean_of_cases(reports, "mean_dice_own", quiet=True)}
    if args.json:
        from .io.atomic import atomic_write_json

        atomic_write_json(args.json, out)  # strict JSON: a NaN score is written as null
        print(f"wrote {args.json}")
    return 0


def _mean_of_cases(reports: list, key: str, quiet: bool = False):
    """The mean over the cases that have a score: a case without one (an empty label map gives no
    Dice) is left out, with a message, instead of turning the mean into NaN."""
    import math

    values = []
    for r in reports:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            values.append(float(v))
        elif not quiet:
            print(f"note: {r.get('label') or r.get('image')} has no score (no labelled object to compare), so it "
                  f"is left out of the mean.", file=sys.stderr)
    return sum(values) / len(values) if values else None


def check_datalist(path, what: str = "datalist") -> None:
    """A Decathlon dataset.json that MONAI can read: a JSON object whose "training", "validation" and
    "test" entries are lists of {"image": path, "label": path} (test: paths or objects with "image").
    Checked here, with a sentence, instead of failing deep inside MONAI with a TypeError."""
    from .io.jsonfile import read_json_file

    path = Path(path)
    data = read_json_file(path, what, fix="Fix it; see MONAI's Decathlon dataset.json format.",
                          point_to="its dataset.json file")
    if not isinstance(data, dict):
        raise ValueError(f"The {what} {path} must hold a JSON object with a \"training\" list of "
                         f"{{\"image\": ..., \"label\": ...}} cases.")
    for key in ("training", "validation", "test"):
        if key not in data:
            continue
        cases = data[key]
        if not isinstance(cases, list):
            raise ValueError(f"The {what} {path}: \"{key}\" must be a list of cases like "
                             f"{{\"image\": \"imagesTr/a.nii.gz\", \"label\": \"labelsTr/a.nii.gz\"}}; got "
                             f"{json.dumps(cases)[:40]}.")
        for i, case in enumerate(cases):
            if key == "test" and isinstance(case, str):
                continue
            needed = ("image",) if key == "test" else ("image", "label")
            if not isinstance(case, dict) or not all(isinstance(case.get(k), str) and case.get(k) for k in needed):
                raise ValueError(f"The {what} {path}: \"{key}\" case {i + 1} must be an object with "
                                 f"{' and '.join(repr(k) for k in needed)} paths; got {json.dumps(case)[:60]}.")


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
        # The Dataset panel cancels a fine-tune with SIGINT. A script that starts napari (or this
        # command) in the background with `&` hands the process SIGINT ignored, and Python then never
        # raises KeyboardInterrupt: the cancel went unheard and the run went on to its last step.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.command == "finetune":
            check_datalist(args.datalist)
            if getattr(args, "validation_datalist", None):
                check_datalist(args.validation_datalist, "validation datalist")
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("cancelled: nothing was written.", file=sys.stderr)
        return EXIT_CANCELLED
    except _user_errors() as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except pickle.UnpicklingError:
        # torch.load(weights_only=True) refused a file (only a resume state is loaded outside
        # model.checkpoints.load_file, which words this itself): it was never executed.
        which = (f" (the resume state {args.out}.resume.pt)" if args.command == "finetune"
                 and getattr(args, "resume", False) else "")
        print(f"error: a PyTorch file{which} holds Python objects other than tensors, or is damaged, so it was "
              f"not loaded (loading it could run arbitrary code). Delete it, or replace it with one from a "
              f"trusted run.", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
