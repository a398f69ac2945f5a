"""A simulated expert: draws the ground-truth box where the object is largest, lets the tool
propagate, then corrects the worst slice and lets it re-propagate: a click at the centre of the
largest error region, or, where the walk ran past the object's end, "stop here" on that slice."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..engine.propagation import bounding_box_xyxy, interior_point_yx, largest_error_region, run_to_completion
from .metrics import dice, normalized_surface_dice

log = logging.getLogger(__name__)


@dataclass
class ObjectScore:
    label: int
    name: str
    dice: float
    nsd: float
    slices_prompted: int
    slices_predicted: int
    slices_truth: int
    clicks: int
    dice_per_round: list = field(default_factory=list)
    stopped: dict = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def largest_error_click(pred_zyx: np.ndarray, truth_zyx: np.ndarray):
    """(z, point_yx, label) at the centre of the largest error region of the worst slice, or None."""
    errors = (pred_zyx ^ truth_zyx).sum(axis=(1, 2))
    if errors.max() == 0:
        return None
    z = int(np.argmax(errors))
    region, kind = largest_error_region(truth_zyx[z], pred_zyx[z])
    return z, interior_point_yx(region), kind


def simulate_object(session, truth_zyx: np.ndarray, label_id: int, name: str = "", clicks: int = 0,
                    mode: str | None = None, stop=None) -> ObjectScore:
    """Segment one object of a session as a simulated expert would, and score it.

    truth_zyx: (Z, H, W) bool ground truth in the session's view frame.
    """
    start = time.perf_counter()
    areas = truth_zyx.sum(axis=(1, 2))
    if areas.max() == 0:
        raise ValueError(f"Label {label_id} is empty in the ground truth; nothing to evaluate.")
    if label_id not in session.labels.objects:
        session.add_object(name=name or f"label {label_id}", label_id=label_id)
    z0 = int(np.argmax(areas))
    box = bounding_box_xyxy(truth_zyx[z0])
    session.segment_slice(label_id, z0, box_xyxy=box)
    result = run_to_completion(session.propagate(label_id, mode=mode, stop=stop))
    pred = session.labels.array == label_id
    rounds = [dice(pred, truth_zyx)]
    clicks_on: dict[int, list] = {}
    for _ in range(clicks):
        click = largest_error_click(pred, truth_zyx)
        if click is None:
            break
        z, point, kind = click
        if not truth_zyx[z].any():
            # The walk ran past the object's end: an expert marks "stop here" on the first slice
            # beyond it (clearing everything further out) rather than clicking.
            present = np.flatnonzero(areas)
            session.stop_here(label_id, int(present[-1] + 1 if z > present[-1] else present[0] - 1))
        else:
            pts = clicks_on.setdefault(z, [])
            pts.append((point, kind))
            seed = session.seeds[label_id].get(z)
            if seed is not None and seed.prompt.get("box_xyxy") is not None:
                box_z = seed.prompt["box_xyxy"]
            else:
                box_z = bounding_box_xyxy(pred[z]) if pred[z].any() else None
            session.segment_slice(label_id, z, points_yx=np.array([p for p, _ in pts]),
                                  point_labels=np.array([k for _, k in pts]), box_xyxy=box_z, multimask=False)
            # Only the neighbours this correction really changes are redone.
            run_to_completion(session.propagate(label_id, mode=mode, stop=stop, from_slice=z))
        pred = session.labels.array == label_id
        rounds.append(dice(pred, truth_zyx))
    return ObjectScore(
        label=int(label_id), name=name, dice=rounds[-1],
        nsd=normalized_surface_dice(pred, truth_zyx, session.view.view_spacing),
        slices_prompted=len(session.seeds[label_id]), slices_predicted=int(pred.any(axis=(1, 2)).sum()),
        slices_truth=int((areas > 0).sum()), clicks=len(rounds) - 1, dice_per_round=rounds,
        stopped=dict(result.stopped), seconds=time.perf_counter() - start)
