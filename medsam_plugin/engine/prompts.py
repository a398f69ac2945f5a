"""Prompt files: objects with boxes and points, in voxel indices or world millimetres.

Format (JSON)::

    {
      "frame": "voxel",              # "voxel" (i, j, k of the file), "world" (RAS mm) or "world_lps"
      "objects": [
        {"id": 1, "name": "spleen",
         "boxes":  [[[i0, j0, k0], [i1, j1, k1]]],          # two opposite corners on one slice
         "points": [{"position": [i, j, k], "label": 1}],  # label 1 foreground, 0 background
         "direction": "both"}                               # optional: both | up | down | none
      ]
    }

Everything is converted once, here, to view coordinates: slice z, points (row, col), boxes xyxy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FRAMES = ("voxel", "world", "world_ras", "world_lps")


class PromptError(ValueError):
    """A prompts file that cannot be used; the message says where and why."""


@dataclass
class SlicePrompt:
    """Prompts for one object on one view slice."""

    z: int
    points_yx: list = field(default_factory=list)
    point_labels: list = field(default_factory=list)
    box_xyxy: np.ndarray | None = None


@dataclass
class ObjectPrompts:
    label_id: int
    name: str
    slices: dict[int, SlicePrompt]
    direction: str = "both"


def load_prompts(path) -> dict:
    """The prompts document in a JSON file; PromptError with a sentence when it cannot be used."""
    from ..io.jsonfile import read_json_file

    path = Path(path)
    data = read_json_file(path, "prompts file", fix="See the README for the format.",
                          point_to="the prompts .json file", error=PromptError)
    if not isinstance(data, dict):
        raise PromptError(f"Prompts file {path} must hold a JSON object with an 'objects' list.")
    return data


def parse_prompts(data: dict, view, source: str = "prompts") -> list[ObjectPrompts]:
    """Validate a prompts document and convert it to view coordinates of `view` (a SliceView)."""
    frame = str(data.get("frame", "voxel")).lower()
    if frame not in FRAMES:
        raise PromptError(f"{source}: unknown frame {frame!r}; use one of {', '.join(FRAMES)}.")
    objects = data.get("objects")
    if not isinstance(objects, list) or not objects:
        raise PromptError(f"{source}: no objects to segment. Add at least one object with a box or points.")
    shape = view.view_shape
    result: list[ObjectPrompts] = []
    seen: set[int] = set()
    for index, obj in enumerate(objects):
        where = f"{source}: object #{index + 1}"
        if not isinstance(obj, dict):
            raise PromptError(f"{where} must be a JSON object.")
        try:
            label_id = int(obj.get("id", index + 1))
        except (TypeError, ValueError, OverflowError):
            raise PromptError(f"{where}: 'id' must be an integer label value.") from None
        if not 1 <= label_id <= 65535 or label_id in seen:
            raise PromptError(f"{where}: label id {label_id} is out of range 1..65535 or used twice.")
        seen.add(label_id)
        name = str(obj.get("name", f"object {label_id}"))
        where = f"{source}: object {label_id} ({name})"
        slices: dict[int, SlicePrompt] = {}
        boxes, points = obj.get("boxes", []) or [], obj.get("points", []) or []
        for key, value in (("boxes", boxes), ("points", points)):
            if not isinstance(value, list):
                raise PromptError(f"{where}: '{key}' must be a list (e.g. \"{key}\": [...]); got {value!r:.40}.")
        for b, box in enumerate(boxes):
            corners = _numbers(box.get("corners") if isinstance(box, dict) else box, f"{where}, box {b + 1}",
                               "two corners of 3 coordinates each, e.g. [[10, 20, 5], [40, 60, 5]]")
            if corners.shape != (2, 3):
                raise PromptError(f"{where}, box {b + 1}: give two corners of 3 coordinates each.")
            zyx = _to_view(corners, frame, view, shape, f"{where}, box {b + 1}")
            z0, z1 = int(round(zyx[0, 0])), int(round(zyx[1, 0]))
            if z0 != z1:
                raise PromptError(f"{where}, box {b + 1}: its corners lie on different {view.axis} slices "
                                  f"({z0} and {z1}); a box is drawn on one slice.")
            sp = slices.setdefault(z0, SlicePrompt(z0))
            if sp.box_xyxy is not None:
                raise PromptError(f"{where}: two boxes on slice {z0}; give one box per slice.")
            (r0, r1), (c0, c1) = sorted(zyx[:, 1]), sorted(zyx[:, 2])
            sp.box_xyxy = np.array([c0, r0, c1, r1], dtype=np.float32)
        for p, point in enumerate(points):
            if isinstance(point, dict):
                position, label = point.get("position"), point.get("label", 1)
            elif isinstance(point, list):
                position, label = point[:3], (point[3] if len(point) > 3 else 1)
            else:
                raise PromptError(f"{where}, point {p + 1}: write a point as {{\"position\": [i, j, k], \"label\": 1}}.")
            position = _numbers(position, f"{where}, point {p + 1}", "a position of 3 coordinates").reshape(-1)
            if position.shape != (3,) or label not in (0, 1) or isinstance(label, bool):
                raise PromptError(f"{where}, point {p + 1}: needs a 3-value position and label 1 (fg) or 0 (bg).")
            zyx = _to_view(position[None], frame, view, shape, f"{where}, point {p + 1}")[0]
            z = int(round(zyx[0]))
            sp = slices.setdefault(z, SlicePrompt(z))
            sp.points_yx.append([zyx[1], zyx[2]])
            sp.point_labels.append(int(label))
        if not slices:
            raise PromptError(f"{where} has neither boxes nor points.")
        for sp in slices.values():
            if sp.box_xyxy is None and sp.point_labels and not any(sp.point_labels):
                raise PromptError(f"{where}: slice {sp.z} has only background points; add a foreground point or a box.")
        direction = str(obj.get("direction", "both")).lower()
        if direction not in ("both", "up", "down", "none"):
            raise PromptError(f"{where}: direction must be both, up, down or none.")
        result.append(ObjectPrompts(label_id, name, slices, direction))
    return result


def _numbers(value, where: str, what: str) -> np.ndarray:
    """A JSON value as a float64 array of finite numbers, or a PromptError saying what was wrong."""
    try:
        if isinstance(value, (str, bytes, dict)) or value is None:
            raise TypeError
        array = np.asarray(value, dtype=np.float64)
    except OverflowError:
        # A JSON integer too long for a float (e.g. 401 digits) is a number, just not a usable one.
        def flat(v):
            return [x for item in v for x in flat(item)] if isinstance(v, list) else [v]

        huge = next((v for v in flat(value) if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 1e300),
                    None)
        digits = f" ({len(str(abs(huge)))} digits)" if huge is not None else ""
        raise PromptError(f"{where}: a coordinate{digits} is not a usable number: it is far too large for any "
                          f"image. Fix the prompts file.") from None
    except (TypeError, ValueError):
        raise PromptError(f"{where}: needs {what}; got {json.dumps(value)[:60]}.") from None
    if not np.all(np.isfinite(array)):
        raise PromptError(f"{where}: the coordinates must be finite numbers; got {np.asarray(array).tolist()} "
                          f"(NaN, Infinity or a number too large). Fix the prompts file.")
    return array


def _to_view(coords: np.ndarray, frame: str, view, shape, where: str) -> np.ndarray:
    if frame == "voxel":
        zyx = view.voxel_to_view(coords)
    else:
        xyz = np.array(coords, dtype=np.float64)
        if frame == "world_lps":
            xyz[:, :2] *= -1  # LPS -> RAS
        zyx = view.world_to_view(xyz)
    zyx = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)
    limits = np.asarray(shape) - 0.5
    if np.any(zyx < -0.5) or np.any(zyx > limits):
        bad = coords[np.argmax(np.any((zyx < -0.5) | (zyx > limits), axis=1))]
        raise PromptError(f"{where}: position {np.round(bad, 2).tolist()} ({frame} frame) lies outside the "
                          f"volume; check the coordinates and the 'frame' field.")
    return zyx
