"""Slice-to-slice propagation of one object through a volume: pure functions over a predictor.

From one or more seeded slices the object is walked outwards; each new slice is prompted from the
previous slice's result. Between two seeds of the same object each seed fills half the gap, so
every slice is prompted from its nearest seed. Long work is a generator that yields `Progress`
and returns a `PropagationResult`; nothing is written anywhere until the caller commits it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Generator

import numpy as np

from .predictor import SlicePrediction

# Prompt modes: which prompts a slice gets from its neighbour's result.
#   box        the previous mask's bounding box, widened by BOX_MARGIN_256 px at 256 scale
#   mask       the previous slice's low-res logits as a dense prompt, nothing else
#   box+mask   both
#   points     one foreground point at the previous mask's deepest interior point
#   box+points the box and that point
PROMPT_MODES = ("box", "mask", "box+mask", "points", "box+points")
DEFAULT_MODE = "box"
# Which of the decoder's answers a propagated slice keeps:
#   single      the decoder's single-mask output
#   consistent  its three candidates, keeping the one that overlaps the previous slice's mask most
CANDIDATE_RULES = ("single", "consistent")
DEFAULT_CANDIDATES = "single"
BOX_MARGIN_256 = 3.0


@dataclass(frozen=True)
class StopRules:
    """When a walk ends. A slice that fails a rule is not kept; the walk in that direction stops.

    min_area: fewer foreground pixels than this means the object has ended.
    min_iou_with_previous: overlap with the previous slice's mask below this means a jump to
        another structure (None to disable).
    min_predicted_iou: the model's own confidence below this stops the walk (None to disable).
    max_distance: at most this many slices from the nearest seed (None: no limit).
    z_range: inclusive (z_min, z_max) the walk may not leave (None: whole volume).
    stop_slices: slices a user marked as "stop here"; the walk never enters them.
    agree_with: (Z, H, W) bool, the object's current result; with it a walk ends where its new
        mask agrees with that result (IoU >= agree_iou): a correction changes only the slices
        it really changes.
    """

    min_area: int = 1
    min_iou_with_previous: float | None = 0.5
    min_predicted_iou: float | None = None
    max_distance: int | None = None
    z_range: tuple[int, int] | None = None
    stop_slices: frozenset = field(default_factory=frozenset)
    agree_with: np.ndarray | None = field(default=None, compare=False, repr=False)
    agree_iou: float = 0.9

    def allows(self, z: int, distance: int) -> str | None:
        """None if slice z may be visited, else the reason it may not."""
        if z in self.stop_slices:
            return "stop slice"
        if self.z_range is not None and not self.z_range[0] <= z <= self.z_range[1]:
            return "z-range limit"
        if self.max_distance is not None and distance > self.max_distance:
            return "distance limit"
        return None

    def rejects(self, new: SlicePrediction, previous: SlicePrediction) -> str | None:
        """None if the new slice's result continues the object, else why it does not."""
        area = int(new.mask_yx.sum())
        if area < max(1, self.min_area):
            return "empty mask"
        if self.min_predicted_iou is not None and new.iou < self.min_predicted_iou:
            return "low predicted IoU"
        if self.min_iou_with_previous is not None:
            if mask_iou(new.mask_yx, previous.mask_yx) < self.min_iou_with_previous:
                return "low overlap with previous slice"
        if self.agree_with is not None and mask_iou(new.mask_yx, self.agree_with[new.z]) >= self.agree_iou:
            return "agrees with the existing result"
        return None


@dataclass
class Progress:
    """One step of long work: `done` of about `total` steps; `z` and `prediction` when a slice ended."""

    done: int
    total: int
    message: str = ""
    z: int | None = None
    prediction: SlicePrediction | None = None


@dataclass
class PropagationResult:
    """Per-slice predictions of one object (seeds included) and why each walk ended."""

    predictions: dict[int, SlicePrediction]
    stopped: dict[str, str]  # walk name -> reason

    @property
    def slices(self) -> list[int]:
        return sorted(self.predictions)

    def mask_zyx(self, shape_zyx: tuple[int, int, int]) -> np.ndarray:
        mask = np.zeros(shape_zyx, dtype=bool)
        for z, pred in self.predictions.items():
            mask[z] = pred.mask_yx
        return mask


class PropagationCancelled(Exception):
    """Raised inside a propagation generator when its cancel event is set."""


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def bounding_box_xyxy(mask_yx: np.ndarray) -> np.ndarray | None:
    """Inclusive (x0, y0, x1, y1) of a mask's foreground, or None when empty."""
    rows = np.flatnonzero(mask_yx.any(axis=1))
    cols = np.flatnonzero(mask_yx.any(axis=0))
    if rows.size == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def interior_point_yx(mask_yx: np.ndarray) -> np.ndarray:
    """The foreground pixel farthest from the background: a click an expert would make."""
    from scipy.ndimage import distance_transform_edt

    dist = distance_transform_edt(np.pad(mask_yx, 1))[1:-1, 1:-1]
    return np.array(np.unravel_index(int(np.argmax(dist)), mask_yx.shape), dtype=np.float32)


def largest_error_region(truth_yx: np.ndarray, pred_yx: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The largest connected region where a mask misses the truth (label 1) or exceeds it (label 0).

    Returns (region mask, click label), or None when the mask equals the truth. Missed regions win ties.
    """
    from scipy.ndimage import label as connected_components

    best = None
    for kind, region in ((1, truth_yx & ~pred_yx), (0, pred_yx & ~truth_yx)):
        comps, count = connected_components(region)
        if count == 0:
            continue
        sizes = np.bincount(comps.ravel())[1:]
        biggest = int(np.argmax(sizes)) + 1
        if best is None or sizes[biggest - 1] > best[0]:
            best = (sizes[biggest - 1], kind, comps == biggest)
    return None if best is None else (best[2], best[1])


def prompt_from_previous(previous: SlicePrediction, mode: str, slice_hw: tuple[int, int]) -> dict:
    """Keyword arguments for `SlicePredictor.predict` that carry `previous` to its neighbour."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"Unknown propagation mode {mode!r}; choose one of {', '.join(PROMPT_MODES)}.")
    kwargs: dict = {}
    if not previous.mask_yx.any():
        raise ValueError(f"Slice {previous.z} holds no mask to propagate from; segment the object there first.")
    if "box" in mode:
        box = bounding_box_xyxy(previous.mask_yx)
        margin = BOX_MARGIN_256 * max(slice_hw) / 256.0
        h, w = slice_hw
        kwargs["box_xyxy"] = np.array([
            max(0.0, box[0] - margin), max(0.0, box[1] - margin),
            min(w - 1.0, box[2] + margin), min(h - 1.0, box[3] + margin)], dtype=np.float32)
    if "mask" in mode:
        kwargs["mask_logits_256"] = previous.logits_256
    if "points" in mode:
        kwargs["points_yx"] = interior_point_yx(previous.mask_yx)[None]
        kwargs["point_labels"] = np.array([1])
    return kwargs


def choose_consistent(pred: SlicePrediction, previous: SlicePrediction) -> SlicePrediction:
    """Keep the multimask candidate that best continues the previous slice's mask."""
    overlaps = [mask_iou(m, previous.mask_yx) for m in pred.all_masks_yx]
    best = int(np.argmax(overlaps))
    return SlicePrediction(z=pred.z, mask_yx=pred.all_masks_yx[best], logits_256=pred.all_logits_256[best],
                           iou=float(pred.all_ious[best]), prompt=pred.prompt)


def _walk(predictor, start: SlicePrediction, targets: list[int], mode: str, stop: StopRules,
          seed_z: int, cancel: threading.Event | None = None, candidates: str = DEFAULT_CANDIDATES) -> Generator[tuple[int, SlicePrediction | None, str | None], None, None]:
    """Visit `targets` in order from `start`; yields (z, prediction or None, stop reason or None)."""
    previous = start
    hw = predictor.volume.shape[1:]
    if targets and not start.mask_yx.any():
        yield targets[0], None, f"the seed on slice {start.z} is empty"
        return
    for z in targets:
        if cancel is not None and cancel.is_set():
            raise PropagationCancelled("Propagation was cancelled; nothing was changed.")
        reason = stop.allows(z, abs(z - seed_z))
        if reason is None:
            if candidates == "consistent":
                pred = choose_consistent(predictor.predict(z, multimask=True, **prompt_from_previous(previous, mode, hw)),
                                         previous)
            else:
                pred = predictor.predict(z, **prompt_from_previous(previous, mode, hw))
            reason = stop.rejects(pred, previous)
            if reason is None:
                yield z, pred, None
                previous = pred
                continue
        yield z, None, reason
        return


def propagate(
    predictor,
    seeds: dict[int, SlicePrediction],
    mode: str = DEFAULT_MODE,
    stop: StopRules | None = None,
    direction: str = "both",
    cancel: threading.Event | None = None,
    candidates: str = DEFAULT_CANDIDATES,
) -> Generator[Progress, None, PropagationResult]:
    """Propagate one object from its seeded slices through the predictor's volume.

    Args:
        predictor: a `SlicePredictor` (or any object with `volume`, `n_slices` and `predict`).
        seeds: slice index -> the accepted prediction on that slice (user-prompted).
        mode: one of PROMPT_MODES.
        stop: the stop rules (defaults: non-empty mask, IoU with previous slice >= 0.5).
        direction: "both", "up" (increasing z) or "down".
        cancel: when set, the generator raises PropagationCancelled at the next slice.
        candidates: one of CANDIDATE_RULES.
    Yields:
        Progress after each slice. Returns the PropagationResult (use `run_to_completion`).
    """
    if not seeds:
        raise ValueError("Propagation needs at least one seeded slice: segment the object on a slice first.")
    if direction not in ("both", "up", "down"):
        raise ValueError(f"direction must be 'both', 'up' or 'down', not {direction!r}.")
    if mode not in PROMPT_MODES:
        raise ValueError(f"Unknown propagation mode {mode!r}; choose one of {', '.join(PROMPT_MODES)}.")
    if candidates not in CANDIDATE_RULES:
        raise ValueError(f"candidates must be one of {', '.join(CANDIDATE_RULES)}, not {candidates!r}.")
    stop = stop or StopRules()
    n = predictor.n_slices
    order = sorted(seeds)
    walks: list[tuple[str, int, list[int]]] = []  # (name, seed z, targets in visiting order)
    if direction in ("both", "down"):
        walks.append((f"down from {order[0]}", order[0], list(range(order[0] - 1, -1, -1))))
    for lower, upper in zip(order, order[1:]):
        middle = (lower + upper) // 2
        walks.append((f"up from {lower}", lower, list(range(lower + 1, middle + 1))))
        walks.append((f"down from {upper}", upper, list(range(upper - 1, middle, -1))))
    if direction in ("both", "up"):
        walks.append((f"up from {order[-1]}", order[-1], list(range(order[-1] + 1, n))))

    total = sum(len(t) for _, _, t in walks)
    predictions = dict(seeds)
    stopped: dict[str, str] = {}
    done = 0
    yield Progress(done, total, "propagating")
    for name, seed_z, targets in walks:
        visited = 0
        for z, pred, reason in _walk(predictor, seeds[seed_z], targets, mode, stop, seed_z, cancel, candidates):
            visited += 1
            done += 1
            if pred is None:
                stopped[name] = f"{reason} at slice {z}"
                break
            predictions[z] = pred
            yield Progress(done, total, f"slice {z}", z=z, prediction=pred)
        else:
            if not targets:
                stopped[name] = "no slices between seeds"
            elif targets[-1] in (0, n - 1):
                stopped[name] = "end of volume"
            else:
                stopped[name] = "met the walk from the neighbouring seed"
        done += len(targets) - visited  # slices this walk will never visit
    yield Progress(total, total, "done")
    return PropagationResult(predictions, stopped)


def run_to_completion(generator, callback=None):
    """Drain a progress generator and return its result; `callback(progress)` sees each step."""
    while True:
        try:
            progress = next(generator)
        except StopIteration as finished:
            return finished.value
        if callback is not None:
            callback(progress)
