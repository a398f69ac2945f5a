"""A simulated expert: draws the ground-truth box where the object is largest, lets the tool
propagate, then corrects and lets it re-propagate: a click at the centre of the largest 3D error
region, or, where that lies past the object's end, "stop here" on the first slice beyond it.

Two scores per object. `dice`/`nsd` score what the object holds in the session's label map, where
the first object to claim a voxel keeps it: with nested or touching labels, an object segmented
later loses the voxels an earlier one already claimed. `dice_own`/`nsd_own` score the object's own
result: the masks the engine returned for it (the prompted slices and its propagation), before
other objects' claims are resolved. With no corrective clicks that is exactly the object segmented
alone; with clicks, the corrections are still chosen from the label map (what the expert sees).

Protocols (how the first prompt is given, on the slice where the object is largest):
- ``box``: the ground-truth box, then propagation (the default);
- ``click``: one foreground click at the object's deepest interior point (farthest from its
  boundary), then propagation;
- ``box3d``: the box, and the walk limited to the label's z-extent (the CVPR 2024 "MedSAM on
  laptop" setting).
``seed_dice`` is the 2D Dice on the prompted slice before propagation; ``dsc_auc``/``nsd_auc`` the
area under the per-round curves of the click rounds (trapezoids, one unit per round; the first
prompt's round is left out, as the CVPR 2025 interactive challenge scores, so fewer than two
clicks give 0). Corrective clicks follow that challenge's rule too (`largest_error_click`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..engine.propagation import bounding_box_xyxy, interior_point_yx, run_to_completion
from .metrics import dice, normalized_surface_dice

PROTOCOLS = ("box", "click", "box3d")
# Names the corrective-click rule (`largest_error_click`), so reports measured with another can be told apart.
CLICK_RULE = "cvpr2025: deepest voxel of the largest 3D error component"
DEFAULT_PROTOCOL = "box"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertSettings:
    """How the simulated expert works on each object and how the tool propagates for it: the first
    prompt (`protocol`, one of PROTOCOLS), the corrective `clicks` after propagation, and the
    propagation's prompt `mode` (None: the model's default) and `stop` rules (None: the session's)."""

    clicks: int = 0
    mode: str | None = None
    stop: object = None
    protocol: str = DEFAULT_PROTOCOL

    def simulate(self, session, truth_zyx: np.ndarray, label_id: int, name: str = "") -> "ObjectScore":
        """`simulate_object` with these settings."""
        return simulate_object(session, truth_zyx, label_id, name=name, clicks=self.clicks, mode=self.mode,
                               stop=self.stop, protocol=self.protocol)


@dataclass
class ObjectScore:
    label: int
    name: str
    dice: float
    nsd: float
    dice_own: float
    nsd_own: float
    slices_prompted: int
    slices_predicted: int
    slices_truth: int
    clicks: int
    protocol: str = DEFAULT_PROTOCOL
    seed_slice: int = -1
    seed_dice: float = float("nan")
    dice_per_round: list = field(default_factory=list)
    nsd_per_round: list = field(default_factory=list)
    dsc_auc: float = 0.0
    nsd_auc: float = 0.0
    span: dict = field(default_factory=dict)
    confidence: dict = field(default_factory=dict)  # slice -> confidence of the first propagation (seeds 1.0)
    stopped: dict = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def largest_error_click(pred_zyx: np.ndarray, truth_zyx: np.ndarray):
    """(z, point_yx, label) of the next corrective click, or None when the prediction is perfect.

    The rule of the CVPR 2025 interactive 3D segmentation challenge: the click goes to the voxel
    deepest inside (largest Euclidean distance transform, in voxels) the largest 26-connected
    error component in 3D; foreground (1) where the truth has the object there, else background
    (0). Among equally deep voxels, the one nearest their centroid (the challenge draws one at
    random; in a thin component many tie).
    A 3D component lets the expert's click land on a stretch of slices the walk missed, not only
    on the slice with the most wrong pixels.
    """
    from scipy import ndimage

    error = pred_zyx != truth_zyx
    if not error.any():
        return None
    components, _ = ndimage.label(error, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = components == int(np.argmax(sizes))
    # Zero padding makes the volume's border count as outside the component.
    depth = ndimage.distance_transform_edt(np.pad(largest, 1))[1:-1, 1:-1, 1:-1]
    deepest = np.argwhere(depth == depth.max())
    z, y, x = deepest[int(np.argmin(((deepest - deepest.mean(axis=0)) ** 2).sum(axis=1)))]
    return int(z), np.array([float(y), float(x)]), int(bool(truth_zyx[z, y, x]))


def area_under_rounds(values) -> float:
    """Trapezoid area under a per-round curve, one unit per round (0 for a single round)."""
    v = np.asarray(values, dtype=np.float64)
    return float(((v[1:] + v[:-1]) / 2).sum()) if v.size > 1 else 0.0


def simulate_object(session, truth_zyx: np.ndarray, label_id: int, name: str = "", clicks: int = 0,
                    mode: str | None = None, stop=None, protocol: str = DEFAULT_PROTOCOL) -> ObjectScore:
    """Segment one object of a session as a simulated expert would, and score it.

    truth_zyx: (Z, H, W) bool ground truth in the session's view frame.
    protocol: one of PROTOCOLS (see the module docstring).
    """
    import dataclasses

    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
    start = time.perf_counter()
    areas = truth_zyx.sum(axis=(1, 2))
    if areas.max() == 0:
        raise ValueError(f"Label {label_id} is empty in the ground truth; nothing to evaluate.")
    if label_id not in session.labels.objects:
        session.add_object(name=name or f"label {label_id}", label_id=label_id)
    z0 = int(np.argmax(areas))
    present = np.flatnonzero(areas)
    clicks_on: dict[int, list] = {}
    if protocol == "click":
        point = interior_point_yx(truth_zyx[z0])
        clicks_on[z0] = [(point, 1)]
        seed = session.segment_slice(label_id, z0, points_yx=point[None], point_labels=np.array([1]))
    else:
        seed = session.segment_slice(label_id, z0, box_xyxy=bounding_box_xyxy(truth_zyx[z0]))
    seed_dice = dice(seed.mask_yx, truth_zyx[z0])
    if protocol == "box3d":
        stop = dataclasses.replace(stop or session.stop_rules, z_range=(int(present[0]), int(present[-1])))
    result = run_to_completion(session.propagate(label_id, mode=mode, stop=stop))
    # The object's own result, from what the engine returned for it: a whole-volume propagation
    # rewrites every slice from the seeds (its predictions include them).
    own = result.mask_zyx(truth_zyx.shape)
    pred = session.labels.array == label_id
    spacing = session.view.view_spacing
    rounds = [dice(pred, truth_zyx)]
    nsd_rounds = [normalized_surface_dice(pred, truth_zyx, spacing)]
    # A model trained on corrections refines what is there (its last logits as a dense prompt);
    # a box-only model is given the clicks with the slice's box instead.
    refine = bool(getattr(session.predictor.spec, "reads_masks", False)
                  and getattr(session.predictor.spec, "reads_points", False))
    for _ in range(clicks):
        click = largest_error_click(pred, truth_zyx)
        if click is None:
            break
        z, point, kind = click
        if not truth_zyx[z].any():
            # The walk ran past the object's end: an expert marks "stop here" on the first slice
            # beyond it (clearing everything further out) rather than clicking.
            z_stop = int(present[-1] + 1 if z > present[-1] else present[0] - 1)
            session.stop_here(label_id, z_stop)
            # Every seed lies on a slice of the object, so the session erased from z_stop outwards.
            if z_stop > present[-1]:
                own[z_stop:] = False
            else:
                own[:z_stop + 1] = False
        else:
            pts = clicks_on.setdefault(z, [])
            pts.append((point, kind))
            seed = session.seeds[label_id].get(z)
            if seed is not None and seed.prompt.get("box_xyxy") is not None:
                box_z = seed.prompt["box_xyxy"]
            elif refine:
                box_z = None  # the session keeps the box (if any) of the slice's last prompt
            else:
                box_z = bounding_box_xyxy(pred[z]) if pred[z].any() else None
            corrected = session.segment_slice(label_id, z, points_yx=np.array([p for p, _ in pts]),
                                              point_labels=np.array([k for _, k in pts]), box_xyxy=box_z,
                                              use_current_mask=refine, multimask=False)
            own[z] = corrected.mask_yx  # (the walk below returns this seed again; kept for clarity)
            # Only the neighbours this correction really changes are redone.
            redone = run_to_completion(session.propagate(label_id, mode=mode, stop=stop, from_slice=z))
            for z_redone, redone_pred in redone.predictions.items():
                own[z_redone] = redone_pred.mask_yx
        pred = session.labels.array == label_id
        rounds.append(dice(pred, truth_zyx))
        nsd_rounds.append(normalized_surface_dice(pred, truth_zyx, spacing))
    if (pred & ~own).any():
        # The label map only ever holds a subset of what was committed for the object.
        raise RuntimeError(f"Label {label_id}: the own-result record lost step with the session's label map; "
                           "dice_own would be wrong.")
    nsd = nsd_rounds[-1]
    same = np.array_equal(own, pred)  # nothing was taken by another object: the scores agree
    return ObjectScore(
        label=int(label_id), name=name, dice=rounds[-1], nsd=nsd,
        dice_own=rounds[-1] if same else dice(own, truth_zyx),
        nsd_own=nsd if same else normalized_surface_dice(own, truth_zyx, spacing),
        slices_prompted=len(session.seeds[label_id]), slices_predicted=int(pred.any(axis=(1, 2)).sum()),
        slices_truth=int((areas > 0).sum()), clicks=len(rounds) - 1, protocol=protocol, seed_slice=z0,
        seed_dice=seed_dice, dice_per_round=rounds, nsd_per_round=nsd_rounds,
        dsc_auc=area_under_rounds(rounds[1:]), nsd_auc=area_under_rounds(nsd_rounds[1:]), span=_span(own, truth_zyx),
        confidence={int(z): round(float(c), 4) for z, c in sorted(getattr(result, "confidence", {}).items())},
        stopped=dict(result.stopped), seconds=time.perf_counter() - start)


def _span(pred_zyx: np.ndarray, truth_zyx: np.ndarray) -> dict:
    """Predicted vs true slice range of the object's own result (evaluation/span.py)."""
    try:
        from .span import span_report
    except ImportError:  # pragma: no cover - span.py is part of the package
        return {}
    return span_report(pred_zyx, truth_zyx)
