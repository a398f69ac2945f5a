"""Segment a cohort from its saved prompts: ``medsam-plugin segment --datalist dataset.json``.

Every case of the datalist's ``training`` and ``test`` lists that has a prompts file (its entry's
``"prompts"``, else ``labelsTr/<case>.prompts.json`` as the dataset panel writes it) is segmented
from those prompts, its brush edits put back on top, and written atomically to
``OUT_DIR/<case>.nii.gz`` (default ``<dataset>/replayed/``). One model is loaded for all cases. A
case that fails is named with its reason and the others go on; the exit status says whether any
failed.

Under ``torchrun`` each process takes every WORLD_SIZE-th case from its RANK (one process per GPU
or CPU socket); the processes share nothing but the final table, gathered on rank 0 through the
process group `training.trainer.init_distributed` joins (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .replay import apply_edits, edits_of_document, read_edits
from .store import LABEL_SUFFIX, PROMPTS_SUFFIX, case_name_of


@dataclass
class BatchCase:
    name: str
    image: str
    prompts: str
    out: str


@dataclass
class CaseResult:
    name: str
    ok: bool
    seconds: float
    objects: int = 0
    voxels: int = 0
    error: str = ""
    out: str = ""


def batch_cases(datalist, data_root=None, out_dir=None) -> list[BatchCase]:
    """The cases of a datalist that have a prompts file, with where their result goes."""
    from ..io.jsonfile import read_json_file

    datalist = Path(datalist)
    raw = read_json_file(datalist, "datalist", point_to="its dataset.json file")
    if not isinstance(raw, dict):
        raise ValueError(f"The datalist {datalist} must hold a JSON object with a \"training\" list.")
    root = Path(data_root) if data_root else datalist.parent
    out_dir = Path(out_dir) if out_dir else root / "replayed"
    cases, seen = [], set()
    for key in ("training", "test"):
        for item in raw.get(key) or []:
            if isinstance(item, str):
                item = {"image": item}
            if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                continue
            image = (root / item["image"]).resolve()
            name = case_name_of(image)
            if "prompts" in item:
                prompts = root / str(item["prompts"])
            else:
                label_dir = (root / item["label"]).parent if isinstance(item.get("label"), str) else root / "labelsTr"
                prompts = label_dir / (name + PROMPTS_SUFFIX)
            if not prompts.is_file() or name in seen:
                continue
            seen.add(name)
            cases.append(BatchCase(name, str(image), str(prompts), str(out_dir / (name + LABEL_SUFFIX))))
    return cases


def replay(session, doc: dict, prompts_path, progress=None) -> list:
    """Segment `session`'s scan from a prompts document (segment each prompted slice, propagate,
    then put the brush edits the document names back on top). Returns the objects parsed."""
    from ..engine.prompts import parse_prompts
    from ..engine.propagation import run_to_completion

    edits_path = edits_of_document(doc, prompts_path)
    edits = read_edits(edits_path, session.volume.data_ijk.shape) if edits_path else {}  # before any model work
    objects = parse_prompts(doc, session.view, source=str(prompts_path))
    for obj in objects:
        session.add_object(name=obj.name, label_id=obj.label_id)
        for sp in obj.slices.values():
            session.segment_slice(obj.label_id, sp.z, points_yx=sp.points_yx or None,
                                  point_labels=sp.point_labels or None, box_xyxy=sp.box_xyxy)
        if obj.direction != "none":
            run_to_completion(session.propagate(obj.label_id, direction=obj.direction), callback=progress)
    if edits:
        put_back_edits(session, edits)
    return objects


def put_back_edits(session, edits: dict) -> None:
    """Apply brush edits ({label: (added_ijk, erased_ijk)}) to the session's labels (objects they
    name that the prompts did not are added, unnamed)."""
    for label_id in sorted(edits):
        if label_id not in session.labels.objects:
            session.add_object(label_id=label_id)
    new = apply_edits(session.labels_ijk(), edits)
    session.paint(session.view.to_view(new).astype(session.labels.array.dtype), what="brush edits")


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def run_batch(cases: list[BatchCase], choice, *, rank: int = 0, world: int = 1, progress: bool = True) -> list[CaseResult]:
    """Segment this process's share of `cases` (`cases[rank::world]`); returns one result per case."""
    from ..engine.prompts import load_prompts
    from ..io import read_volume, write_label_map

    mine = cases[rank::world]
    results: list[CaseResult] = []
    loaded = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"cases (rank {rank})" if world > 1 else "cases", unit="case",
                   file=sys.stderr, disable=None, position=rank if world > 1 else None)
    for case in mine:
        t0 = time.perf_counter()
        try:
            doc = load_prompts(case.prompts)
            volume = read_volume(case.image)
            axis = str(doc.get("axis") or choice.axis)
            if loaded is None:
                loaded = choice.load()  # once, after the first case has read
            session = dataclasses.replace(choice, axis=axis).session(volume, loaded_model=loaded)
            objects = replay(session, doc, Path(case.prompts))
            labels_ijk = session.labels_ijk()
            Path(case.out).parent.mkdir(parents=True, exist_ok=True)
            names = session.labels.names()
            colors = {k: o.color for k, o in session.labels.objects.items()}
            write_label_map(case.out, labels_ijk, volume, names=names, colors=colors)  # atomic, with sidecars
            results.append(CaseResult(case.name, True, time.perf_counter() - t0, len(objects),
                                      int(np.count_nonzero(labels_ijk)), out=case.out))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one broken case must not stop the cohort
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            results.append(CaseResult(case.name, False, time.perf_counter() - t0, error=message.strip().splitlines()[0]
                                      if message.strip() else type(exc).__name__))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


def gather(results: list[CaseResult], world: int) -> list[CaseResult]:
    """Every rank's results on every rank (the process group torchrun started), in case order."""
    if world <= 1:
        return results
    import torch.distributed as dist

    everyone: list = [None] * world
    dist.all_gather_object(everyone, [asdict(r) for r in results])
    return [CaseResult(**r) for part in everyone for r in part]


def summary_table(results: list[CaseResult]) -> str:
    width = max([len("case")] + [len(r.name) for r in results])
    lines = [f"{'case':<{width}}  {'result':<7} {'objects':>7} {'voxels':>10} {'sec':>7}  note"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {'ok' if r.ok else 'FAILED':<7} {r.objects:>7} {r.voxels:>10} "
                     f"{r.seconds:7.1f}  {r.out if r.ok else r.error}")
    ok = sum(r.ok for r in results)
    lines.append(f"{ok} of {len(results)} cases segmented" + (f"; failed: {', '.join(r.name for r in results if not r.ok)}"
                                                           if ok < len(results) else ""))
    return "\n".join(lines)


def cmd_segment_datalist(args) -> int:
    """`medsam-plugin segment --datalist dataset.json [--out-dir DIR]`; returns the exit status."""
    from ..engine.choice import ModelChoice

    cases = batch_cases(args.datalist, getattr(args, "data_root", None), args.out_dir)
    if not cases:
        raise ValueError(f"No case of {args.datalist} has a prompts file (labelsTr/<case>.prompts.json, as the "
                         f"napari Dataset panel saves them, or a \"prompts\" entry per case): nothing to segment.")
    rank, world = _dist_info()
    info = None
    choice = ModelChoice.from_args(args)
    if choice.cache_dir is None:
        from ..io.cache import cache_dir

        # the napari widget's embedding cache: the slices annotated there are encoded already
        choice = dataclasses.replace(choice, cache_dir=str(cache_dir("embeddings")))
    if world > 1:
        from ..training.trainer import init_distributed

        device_type = "cuda" if str(args.device).startswith("cuda") or (
            args.device == "auto" and _cuda()) else "cpu"
        info = init_distributed(device_type)
        rank, world = info.rank, info.world
        if device_type == "cuda" and args.device in ("auto", "cuda"):
            choice = dataclasses.replace(choice, device=f"cuda:{info.local_rank}")
    try:
        results = gather(run_batch(cases, choice, rank=rank, world=world), world)
    finally:
        if info is not None and info.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()
    by_name = {c.name: i for i, c in enumerate(cases)}
    results.sort(key=lambda r: by_name.get(r.name, 0))
    if rank == 0:
        print(summary_table(results))
        if getattr(args, "json", None):
            from ..io.atomic import atomic_write_json

            atomic_write_json(args.json, {"cases": [asdict(r) for r in results]})
    failed = [r for r in results if not r.ok]
    if failed:
        if rank == 0:
            print("error: " + "; ".join(f"{r.name}: {r.error}" for r in failed), file=sys.stderr)
        return 1
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False
