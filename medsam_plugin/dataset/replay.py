"""What made a label map, kept so it can be made again: prompts in the CLI's format, and brush edits.

`prompts_document(session)` writes the prompts drawn for each object (`SegmentationSession.prompts`,
view frame) as the prompts file of ``medsam-plugin segment --prompts`` (voxel frame, so it does not
depend on how the scan was shown): per slice, its last box (clipped to the image, as the widget
does) and its points; ``direction`` "both" for an object that was propagated, "none" otherwise.

Brush edits (`SegmentationSession.edits`: per object and slice, the voxels the user added and
erased) are stored on the scan's voxel grid in a compressed ``.npz`` sidecar that the prompts file
names (``"edits": "<case>.edits.npz"``); `apply_edits` puts them back on top of the model's result,
which is what ``segment --prompts`` does when the file names one.

What a replay gives back voxel for voxel: boxes and clicks on slices, propagation, brush edits.
Corrective clicks after a propagation are replayed as more prompts on their slice (the gap
between prompted slices is filled from both ends), which can differ from the interactive
correction by some voxels; stop slices (X) are not part of the prompts format.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

EDITS_FORMAT = "medsam_plugin.edits/1"


def _slice_prompts(prompts: dict, shape_hw) -> dict[int, dict]:
    """{z: {"box_yx": (r0, c0, r1, c1) or None, "fg": [(r, c)], "bg": [(r, c)]}} of one object's drawn prompts."""
    h, w = (int(v) for v in shape_hw)
    out: dict[int, dict] = {}
    for corners in prompts.get("boxes", []):
        c = np.asarray(corners, dtype=np.float64).reshape(-1, 3)
        if not len(c):
            continue
        z = int(round(c[0, 0]))
        r0, r1 = np.clip([c[:, 1].min(), c[:, 1].max()], 0, h - 1)
        c0, c1 = np.clip([c[:, 2].min(), c[:, 2].max()], 0, w - 1)
        if r1 - r0 < 2 or c1 - c0 < 2:
            continue  # a box off the image: the widget refuses it too
        out.setdefault(z, {"box_yx": None, "fg": [], "bg": []})["box_yx"] = (r0, c0, r1, c1)  # the last one wins
    for key in ("fg", "bg"):
        for z, r, col in np.asarray(prompts.get(key, []), dtype=np.float64).reshape(-1, 3):
            if 0 <= r <= h - 1 and 0 <= col <= w - 1:
                out.setdefault(int(round(z)), {"box_yx": None, "fg": [], "bg": []})[key].append((r, col))
    # a slice with background clicks only cannot be a prompt of its own (the CLI refuses it)
    return {z: p for z, p in out.items() if p["box_yx"] is not None or p["fg"]}


def prompts_document(session, model_name: str | None = None) -> dict:
    """The session's drawn prompts as a prompts file (see the module's docstring)."""
    view = session.view
    shape_hw = session.shape_zyx[1:]
    objects = []
    for label_id, obj in sorted(session.labels.objects.items()):
        per_slice = _slice_prompts(session.prompts_of(label_id), shape_hw)
        if not per_slice:
            continue
        boxes, points = [], []
        for z, p in sorted(per_slice.items()):
            if p["box_yx"] is not None:
                r0, c0, r1, c1 = p["box_yx"]
                ijk = view.view_to_voxel(np.array([[z, r0, c0], [z, r1, c1]], dtype=np.float64))
                boxes.append(np.round(np.asarray(ijk, dtype=np.float64), 4).tolist())
            for key, label in (("fg", 1), ("bg", 0)):
                for r, c in p[key]:
                    ijk = view.view_to_voxel(np.array([[z, r, c]], dtype=np.float64))[0]
                    points.append({"position": np.round(np.asarray(ijk, dtype=np.float64), 4).tolist(), "label": label})
        entry = {"id": int(label_id), "name": obj.name, "direction": "both" if session.was_propagated(label_id) else "none"}
        if boxes:
            entry["boxes"] = boxes
        if points:
            entry["points"] = points
        objects.append(entry)
    doc = {"frame": "voxel", "axis": view.axis, "objects": objects}
    if model_name:
        doc["model"] = str(model_name)
    return doc


def session_edits_ijk(session) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The session's brush edits on the scan's voxel grid: {label id: (added_ijk, erased_ijk)} bool."""
    out = {}
    shape = session.shape_zyx
    for label_id, by_z in session.edits.items():
        if label_id not in session.labels.objects or not by_z:
            continue
        added = np.zeros(shape, dtype=bool)
        erased = np.zeros(shape, dtype=bool)
        for z, (a, e) in by_z.items():
            added[z], erased[z] = a, e
        if added.any() or erased.any():
            out[int(label_id)] = (session.view.from_view(added), session.view.from_view(erased))
    return out


def _npz_bytes(edits: dict[int, tuple[np.ndarray, np.ndarray]], shape) -> bytes:
    arrays = {"format": np.array(EDITS_FORMAT), "shape": np.asarray(shape, dtype=np.int64),
              "ids": np.array(sorted(edits), dtype=np.int64)}
    for label_id, (added, erased) in edits.items():
        arrays[f"added_{label_id}"] = np.flatnonzero(added).astype(np.int64)
        arrays[f"erased_{label_id}"] = np.flatnonzero(erased).astype(np.int64)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def edits_items(path: Path, edits: dict, shape) -> list[tuple]:
    """The edits sidecar as a planned item of `io.writers.write_planned` (written with the label map)."""
    payload = _npz_bytes(edits, tuple(int(s) for s in shape))
    return [(Path(path), lambda tmp: Path(tmp).write_bytes(payload), None)]


def read_edits(path, shape_ijk) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Brush edits from a sidecar, checked against the scan's voxel grid; ValueError with a sentence."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != EDITS_FORMAT:
                raise ValueError
            shape = tuple(int(v) for v in z["shape"])
            ids = [int(v) for v in z["ids"]]
            flat = {k: np.asarray(z[k]) for k in z.files if k.startswith(("added_", "erased_"))}
    except FileNotFoundError:
        raise ValueError(f"The brush edits file {path} named by the prompts file does not exist.") from None
    except (ValueError, KeyError, OSError, EOFError):
        raise ValueError(f"The brush edits file {path} is not an edits file of medsam-plugin (or is damaged).") from None
    if shape != tuple(int(s) for s in shape_ijk):
        raise ValueError(f"The brush edits in {path} were made on a scan of {shape} voxels; this scan has "
                         f"{tuple(shape_ijk)}. Use the scan they belong to.")
    size = int(np.prod(shape))
    out = {}
    for label_id in ids:
        masks = []
        for kind in ("added", "erased"):
            idx = flat.get(f"{kind}_{label_id}", np.zeros(0, np.int64))
            if idx.size and (idx.min() < 0 or idx.max() >= size):
                raise ValueError(f"The brush edits file {path} is damaged (a voxel index lies off the scan).")
            m = np.zeros(size, dtype=bool)
            m[idx] = True
            masks.append(m.reshape(shape))
        out[label_id] = (masks[0], masks[1])
    return out


def apply_edits(labels_ijk: np.ndarray, edits: dict[int, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The label map with the brush edits on top: each object's added voxels become it, its erased
    voxels become background (where it still holds them). Objects in label order."""
    out = np.array(labels_ijk, copy=True)
    for label_id in sorted(edits):
        added, erased = edits[label_id]
        out[added] = label_id
        out[erased & (out == label_id)] = 0
    return out


def edits_of_document(doc: dict, prompts_path) -> Path | None:
    """The edits sidecar a prompts document names (relative to the prompts file), or None."""
    name = doc.get("edits") if isinstance(doc, dict) else None
    if not name:
        return None
    return Path(prompts_path).parent / str(name)
