"""SegmentationSession: the one object the CLI and the napari widget talk to.

It ties a `Volume` to its radiological slice view, the preprocessed uint8 volume, a lazily loaded
model with its per-slice embedding cache, the objects being segmented with their seeds, and the
multi-object label volume with undo. All coordinates here are view coordinates (z, row, col).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Generator, Sequence

import numpy as np

from ..io import SliceView, Volume
from ..model.defaults import DEFAULT_MODEL
from .embedding_cache import EmbeddingCache
from .labels import LabelVolume, SegmentedObject
from .predictor import SlicePrediction, SlicePredictor
from .preprocessing import normalize_volume, parse_window
from .propagation import (DEFAULT_CANDIDATES, DEFAULT_MODE, Progress, PropagationResult, SliceSignals, StopRules,
                          propagate)

log = logging.getLogger(__name__)


class SegmentationSession:
    """Interactive segmentation of one volume.

    Args:
        volume: the scan, as read by `medsam_plugin.io.read_volume`.
        model: registry name or checkpoint path (loaded on first use, not here).
        device: "auto", "cpu", "cuda", "mps".
        axis: slicing axis, "axial", "coronal" or "sagittal".
        window: CT window preset, "mr", (level, width) or None (by modality).
        loaded_model: an already loaded model to share between sessions (skips loading).
        cache_dir: folder for on-disk embeddings (None: memory only).
    """

    def __init__(self, volume: Volume, model: str = DEFAULT_MODEL, device: str = "auto", axis: str = "axial",
                 window=None, loaded_model=None, cache_dir=None, cache_bytes: int | None = 2 * 1024**3):
        self.volume = volume
        self.view = SliceView(volume, axis=axis)
        self.image_zyx = self.view.to_view(volume.data_ijk)
        self.modality = getattr(volume, "modality", "unknown")
        self.model_name = model
        self.device = device
        self._loaded = loaded_model
        self._predictor: SlicePredictor | None = None
        self._cache = EmbeddingCache(max_bytes=cache_bytes, disk_dir=cache_dir)
        self._lock = threading.RLock()
        self.labels = LabelVolume(self.image_zyx.shape)
        self.labels.extra_state = (self._snapshot_seeds, self._restore_seeds)  # seeds follow undo/redo
        self.seeds: dict[int, dict[int, SlicePrediction]] = {}
        self.stop_slices: dict[int, set[int]] = {}  # per object: slices its walks never enter
        # Per object, per slice: (added_yx, erased_yx) bool masks of the user's brush edits, which
        # later propagations of that object keep (a re-propagation must not undo hand work).
        self.edits: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        # What a new result may overwrite (3D Slicer's choice): "none" (a voxel stays with the object
        # that claimed it first), "all" (the new result wins), "allow" (objects may overlap: the shared
        # label map keeps the first claim, each object's own mask keeps the rest, `object_mask`).
        self.overlap = "none"
        self.locked: set[int] = set()  # objects nothing may change (their voxels, seeds, painting)
        self.overlaps: dict[int, dict[int, np.ndarray]] = {}  # "allow": per object, per slice, voxels others hold
        self.withheld: dict[int, int] = {}  # the last commit: other label id -> voxels it kept from the object
        self._propagated: dict[int, dict[int, SlicePrediction]] = {}
        # Per object: slice -> confidence / stop signals of its last propagation, and why its walks ended.
        self._confidence: dict[int, dict[int, float]] = {}
        self.signals: dict[int, dict[int, SliceSignals]] = {}
        self.stopped: dict[int, dict[str, str]] = {}
        self._mode: str | None = None  # None: the loaded model's measured default mode
        self.candidates = DEFAULT_CANDIDATES
        self.stop_rules = StopRules()
        self.window = parse_window(window)
        self.image_u8 = normalize_volume(self.image_zyx, self.modality, self.window)

    # ------------------------------------------------------------------ model
    @property
    def mode(self) -> str:
        """The propagation mode: the one set, else the model's measured default (`ModelSpec.default_mode`)."""
        if self._mode is not None:
            return self._mode
        spec = getattr(self._loaded, "spec", None)
        if spec is None:
            from ..model.registry import REGISTRY

            spec = REGISTRY.get(str(self.model_name))
        return getattr(spec, "default_mode", None) or DEFAULT_MODE

    @mode.setter
    def mode(self, value: str | None) -> None:
        self._mode = value

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(self.image_zyx.shape)

    @property
    def model_loaded(self) -> bool:
        return self._predictor is not None

    @property
    def predictor(self) -> SlicePredictor:
        """The predictor, loading the model on first use."""
        with self._lock:
            if self._predictor is None:
                if self._loaded is None:
                    from ..model.registry import load_model

                    self._loaded = load_model(self.model_name, device=self.device)
                    log.info("model %s on %s", self._loaded.spec.name, self._loaded.device)
                from ..model.fast import make_encoder

                encoder = make_encoder(self._loaded)
                self._predictor = SlicePredictor(self._loaded, cache=self._cache, encoder=encoder)
                self._predictor.set_volume(self.image_u8)
            return self._predictor

    @property
    def loaded_model(self):
        """The loaded model (loads it on first use); pass it to other sessions to share it."""
        return self.predictor.loaded

    def set_model(self, model: str = DEFAULT_MODEL, device: str = "auto", loaded_model=None) -> None:
        """Switch model or device; objects, labels and seeds stay, embeddings are recomputed."""
        with self._lock:
            self.model_name, self.device, self._loaded = model, device, loaded_model
            self._predictor = None
            self._cache.reset()

    def set_window(self, window) -> None:
        """Change the intensity window; embeddings of the old window are dropped."""
        self.window = parse_window(window)
        self.image_u8 = normalize_volume(self.image_zyx, self.modality, self.window)
        if self._predictor is not None:
            self._predictor.set_volume(self.image_u8)

    def precompute(self, zs: Sequence[int] | None = None, batch_size: int | None = None,
                   cancel: threading.Event | None = None) -> Generator[Progress, None, int]:
        """Encode slices ahead of time (all by default); yields Progress, returns slices encoded.

        batch_size: None lets the encoder path choose (8 with OpenVINO or CUDA, 1 for torch on CPU, as measured).
        """
        predictor = self.predictor
        zs = list(range(self.shape_zyx[0])) if zs is None else list(zs)
        todo = [z for z in zs if not predictor.has_embedding(z)]
        yield Progress(0, len(todo), "encoding slices")
        done = 0
        for done in predictor.precompute(todo, batch_size=batch_size):
            yield Progress(done, len(todo), "encoding slices")
            if cancel is not None and cancel.is_set():
                break
        return done

    # ------------------------------------------------------------------ objects
    def add_object(self, name: str | None = None, label_id: int | None = None, color=None) -> SegmentedObject:
        obj = self.labels.add_object(name=name, label_id=label_id, color=color)
        self.seeds.setdefault(obj.label_id, {})
        return obj

    def remove_object(self, label_id: int) -> None:
        self.labels.remove_object(label_id)
        self.locked.discard(label_id)
        self.overlaps.pop(label_id, None)
        self.edits.pop(label_id, None)
        self.seeds.pop(label_id, None)
        self.stop_slices.pop(label_id, None)
        self._propagated.pop(label_id, None)
        for per_object in (self._confidence, self.signals, self.stopped):
            per_object.pop(label_id, None)

    def clear_object(self, label_id: int) -> int:
        """Erase an object's voxels, seeds, brush edits and stop slices (voxels undoable); the object stays."""
        self._require(label_id)
        changed = self.labels.clear_object(label_id)
        self.seeds[label_id] = {}
        self.edits.pop(label_id, None)
        self.overlaps.pop(label_id, None)
        self.stop_slices.pop(label_id, None)  # a cleared object starts over: nothing bars its walks
        self._propagated.pop(label_id, None)
        for per_object in (self._confidence, self.signals, self.stopped):
            per_object.pop(label_id, None)
        return changed

    @property
    def confidence(self) -> dict[int, dict[int, float]]:
        """Per object: `confidence_of(label_id)` (slice -> confidence in [0, 1])."""
        return {label_id: self.confidence_of(label_id) for label_id in self.labels.objects}

    def confidence_of(self, label_id: int) -> dict[int, float]:
        """Slice -> how sure the engine is of object `label_id` there, in [0, 1], for the slices it holds now.

        Seeds (user-prompted slices) are 1.0, propagated slices carry their `slice_confidence`;
        slices the object holds only because the user painted them have no entry. Read from the
        current labels, so it follows undo, clearing and "stop here".
        """
        self._require(label_id)
        present = (self.labels.array == label_id).any(axis=(1, 2))
        scores = {z: c for z, c in self._confidence.get(label_id, {}).items() if present[z]}
        scores.update({z: 1.0 for z in self.seeds.get(label_id, {}) if present[z]})
        return dict(sorted(scores.items()))

    def mark_stop(self, label_id: int, z: int, stop: bool = True) -> None:
        """Mark (or unmark) slice z as one the object's propagation must not enter."""
        self._require(label_id)
        marks = self.stop_slices.setdefault(label_id, set())
        marks.add(int(z)) if stop else marks.discard(int(z))

    def _snapshot_seeds(self) -> dict:
        # Seeds and brush edits travel with undo/redo (their arrays are never modified in place).
        return {"seeds": {label: dict(by_z) for label, by_z in self.seeds.items()},
                "edits": {label: dict(by_z) for label, by_z in self.edits.items()},
                "overlaps": {label: dict(by_z) for label, by_z in self.overlaps.items()}}

    def _restore_seeds(self, snapshot: dict) -> None:
        self.seeds = {label: dict(by_z) for label, by_z in snapshot["seeds"].items()}
        self.edits = {label: dict(by_z) for label, by_z in snapshot["edits"].items()}
        self.overlaps = {label: dict(by_z) for label, by_z in snapshot["overlaps"].items()}

    # ------------------------------------------------------------------ overlap rule
    OVERLAP_MODES = ("none", "all", "allow")

    def set_overlap(self, mode: str) -> None:
        """What a new result may overwrite: "none" (first claim wins), "all", or "allow" overlap."""
        if mode not in self.OVERLAP_MODES:
            raise ValueError(f"The overlap rule is one of {', '.join(self.OVERLAP_MODES)}; got {mode!r}.")
        self.overlap = mode

    def _commit(self, label_id: int, masks: dict[int, np.ndarray], what: str) -> int:
        """Write an object's masks under the overlap rule; count in `withheld` what other objects kept."""
        if label_id in self.locked:
            raise PermissionError(f"'{self.labels.objects[label_id].name}' is locked: unlock it to change it.")
        arr = self.labels.array
        withheld: dict[int, int] = {}
        kept_apart: dict[int, np.ndarray] = {}
        for z, m in masks.items():
            m = np.asarray(m, dtype=bool)
            held = arr[z]
            blocked = m & (held != 0) & (held != label_id)
            if self.overlap == "all":
                blocked &= np.isin(held, list(self.locked))
            if blocked.any():
                ids, counts = np.unique(held[blocked], return_counts=True)
                for i, c in zip(ids.tolist(), counts.tolist()):
                    withheld[i] = withheld.get(i, 0) + c
                kept_apart[int(z)] = blocked
        changed = self.labels.commit(label_id, masks, overwrite=self.overlap == "all", what=what,
                                     protected=self.locked)
        self.withheld = withheld
        if self.overlap == "allow":  # after the commit: its undo entry holds the overlaps as they were
            own = self.overlaps.setdefault(label_id, {})
            for z in masks:
                if int(z) in kept_apart:
                    own[int(z)] = kept_apart[int(z)]
                else:
                    own.pop(int(z), None)
        return changed

    def object_mask(self, label_id: int) -> np.ndarray:
        """(Z, H, W) bool: the object's own result, its overlaps with other objects included ("allow")."""
        self._require(label_id)
        mask = self.labels.array == label_id
        for z, extra in self.overlaps.get(label_id, {}).items():
            mask[z] |= extra
        return mask

    def withheld_sentence(self, label_id: int) -> str:
        """What the last commit of `label_id` did not get and why, or "" when it got everything."""
        if not self.withheld:
            return ""
        total = sum(self.withheld.values())
        names = ", ".join(f"'{self.labels.objects[i].name}'" if i in self.labels.objects else f"label {i}"
                          for i in sorted(self.withheld, key=lambda i: -self.withheld[i]))
        if self.overlap == "allow":
            return (f"{total:,} voxels overlap {names}: the label map keeps them there, the object's own "
                    "layer and file keep them too.")
        why = "locked" if self.overlap == "all" else "overwrite none"
        return (f"{total:,} voxels were withheld: they belong to {names} ({why}). Choose 'overwrite all' or "
                "'allow overlap' under Overlap to change that.")

    # ------------------------------------------------------------------ brush edits
    def paint(self, new_array: np.ndarray, what: str = "paint") -> int:
        """Take the user's painted label volume (view frame, same shape) as one undoable step.

        The voxels each object gained or lost are remembered per slice, so a later propagation
        of that object keeps them (`_apply_edits`). Returns the number of voxels changed.
        """
        new_array = np.asarray(new_array)
        if new_array.shape != self.labels.array.shape:
            raise ValueError(f"Label array has shape {new_array.shape}; expected {self.labels.array.shape}.")
        old = self.labels.array
        zs = np.flatnonzero((new_array != old).any(axis=(1, 2)))
        if zs.size == 0:
            return 0
        edits = {label: dict(by_z) for label, by_z in self.edits.items()}
        for z in zs:
            o, n = old[z], new_array[z]
            for label in set(np.unique(o[o != n]).tolist()) | set(np.unique(n[o != n]).tolist()):
                if not label:
                    continue
                added, erased = (n == label) & (o != label), (o == label) & (n != label)
                prev_add, prev_erase = edits.get(label, {}).get(int(z), (None, None))
                if prev_add is not None:
                    added, erased = (prev_add & ~erased) | added, (prev_erase & ~added) | erased
                edits.setdefault(int(label), {})[int(z)] = (added, erased)
        changed = self.labels.set_array(new_array.astype(self.labels.array.dtype), what=what)  # snapshots the old edits
        self.edits = edits
        for label in self.labels.objects:
            self.seeds.setdefault(label, {})
        return changed

    def _apply_edits(self, label_id: int, masks: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """masks (z -> (H, W) bool) of `label_id` with its brush edits applied; slices it painted are added."""
        edits = self.edits.get(label_id, {})
        if not edits:
            return masks
        empty = np.zeros(self.shape_zyx[1:], dtype=bool)
        out = dict(masks)
        for z in set(masks) | set(edits):
            added, erased = edits.get(z, (empty, empty))
            out[z] = (np.asarray(masks.get(z, self.labels.array[z] == label_id), dtype=bool) | added) & ~erased
        return out

    def _require(self, label_id: int) -> None:
        if label_id not in self.labels.objects:
            raise KeyError(f"There is no object with label {label_id}. Add it first (add_object).")

    # ------------------------------------------------------------------ one slice
    def segment_slice(self, label_id: int, z: int, points_yx=None, point_labels=None, box_xyxy=None,
                      use_current_mask: bool = False, multimask: bool | None = None,
                      commit: bool = True) -> SlicePrediction:
        """Segment object `label_id` on slice z from the user's prompts and make it a seed.

        use_current_mask: also give the object's current result on this slice as a dense prompt
            (for corrections: clicks refine what is there instead of starting over).
        multimask: None picks SAM's rule: several candidates for a lone point, one otherwise.
        """
        self._require(label_id)
        n_points = 0 if points_yx is None else len(np.asarray(points_yx).reshape(-1, 2))
        if multimask is None:
            # SAM's rule (three candidates for a lone point) for models never trained on points;
            # a model trained on clicks answers them with its one trained output.
            reads_points = getattr(getattr(self.predictor, "spec", None), "reads_points", False)
            multimask = box_xyxy is None and n_points == 1 and not use_current_mask and not reads_points
        mask_logits = None
        previous = self.seeds.get(label_id, {}).get(z) or self._last_prediction(label_id, z)
        if use_current_mask and previous is not None:
            mask_logits = previous.logits_256
            if box_xyxy is None and previous.prompt.get("box_xyxy") is not None:
                box_xyxy = previous.prompt["box_xyxy"]
        with self._lock:
            pred = self.predictor.predict(z, points_yx=points_yx, point_labels=point_labels, box_xyxy=box_xyxy,
                                          mask_logits_256=mask_logits, multimask=multimask)
        if commit:
            self.accept(label_id, pred)
        return pred

    def _last_prediction(self, label_id: int, z: int) -> SlicePrediction | None:
        return self._propagated.get(label_id, {}).get(z)

    def accept(self, label_id: int, pred: SlicePrediction) -> None:
        """Make a slice result a seed of the object and write it into the labels (undoable)."""
        self._require(label_id)
        # Commit first: the undo entry records the seeds as they were before this slice.
        self._commit(label_id, {pred.z: pred.mask_yx}, what=f"segment {label_id} on slice {pred.z}")
        self.seeds.setdefault(label_id, {})[pred.z] = pred

    def correct(self, label_id: int, pred: SlicePrediction, direction: str = "both",
                cancel: threading.Event | None = None) -> Generator[Progress, None, PropagationResult | None]:
        """Take a corrected slice result as a seed and, if the object was propagated, re-propagate from it.

        `pred` comes from `segment_slice(..., use_current_mask=True, commit=False)` (clicks that refine
        what the object holds on that slice). The re-propagation walks out from the slice only
        until the new masks agree with the existing result (`propagate(from_slice=...)`). The slice
        and what it changed elsewhere are one undo step. A cancelled re-propagation keeps the
        corrected slice only. Returns the propagation result, or None when there was none to redo.
        """
        self._require(label_id)
        start = self.labels.pushes
        self.accept(label_id, pred)
        what = f"correct {label_id} on slice {pred.z}"
        if label_id not in self._propagated:
            self.labels.merge_last(self.labels.pushes - start, what)
            return None
        try:
            result = yield from self.propagate(label_id, direction, cancel=cancel, from_slice=pred.z)
        finally:
            self.labels.merge_last(self.labels.pushes - start, what)
        return result

    # ------------------------------------------------------------------ state (autosave)
    def to_state(self) -> dict:
        """The session's work besides the voxels, as JSON-able data (`from_state` takes it back)."""
        return {
            "format": "medsam_plugin.session/1",
            "scan": str(self.volume.source_path) if getattr(self.volume, "source_path", None) else None,
            "axis": self.view.axis,
            "objects": [{"label_id": k, "name": o.name, "color": list(o.color)} for k, o in self.labels.objects.items()],
            "stop_slices": {str(k): sorted(self.stop_slices.get(k, ())) for k in self.labels.objects},
            "seed_slices": {str(k): sorted(v) for k, v in self.seeds.items() if k in self.labels.objects},
            "propagated": sorted(k for k in self._propagated if k in self.labels.objects),
            "overlap": self.overlap,
            "locked": sorted(self.locked),
        }

    def from_state(self, labels_zyx: np.ndarray, state: dict, what: str = "restore autosave") -> None:
        """Take back `to_state()` and its label volume (one undoable step for the voxels).

        Seeds come back from the labels on the seed slices (`seed_from_mask`), so propagation can go
        on from them; objects, names, colours, stop slices, the overlap rule and locks as saved.
        """
        labels_zyx = np.asarray(labels_zyx)
        if tuple(labels_zyx.shape) != tuple(self.shape_zyx):
            raise ValueError(f"The saved labels have shape {labels_zyx.shape}; this scan's view is {self.shape_zyx}.")
        for obj in state.get("objects", []):
            lid = int(obj["label_id"])
            color = tuple(obj.get("color") or ()) or None
            if lid not in self.labels.objects:
                self.add_object(name=obj.get("name"), label_id=lid, color=color)
            else:
                self.labels.objects[lid].name = obj.get("name", self.labels.objects[lid].name)
                if color:
                    self.labels.objects[lid].color = color
        self.labels.set_array(labels_zyx.astype(self.labels.array.dtype), what=what)
        self.stop_slices = {int(k): {int(z) for z in zs} for k, zs in state.get("stop_slices", {}).items() if zs}
        for k, zs in state.get("seed_slices", {}).items():
            lid = int(k)
            if lid in self.labels.objects:
                self.seeds[lid] = {int(z): self.seed_from_mask(lid, int(z)) for z in zs
                                   if (self.labels.array[int(z)] == lid).any()}
        for lid in state.get("propagated", []):
            if int(lid) in self.labels.objects:
                self._propagated.setdefault(int(lid), {})
        self.overlap = state.get("overlap", self.overlap) if state.get("overlap") in self.OVERLAP_MODES else self.overlap
        self.locked = {int(k) for k in state.get("locked", []) if int(k) in self.labels.objects}

    def seed_from_mask(self, label_id: int, z: int) -> SlicePrediction:
        """A seed made from what the object holds on slice z (a restored or painted slice).

        Its low-res logits are the mask in the decoder's 256 x 256 frame (longest side scaled to
        256, padded bottom/right), +8 inside and -8 outside, so mask-prompted modes can use it.
        """
        mask = self.labels.array[z] == label_id
        h, w = mask.shape
        vh, vw = max(1, int(round(h * 256 / max(h, w)))), max(1, int(round(w * 256 / max(h, w))))
        rows = np.minimum((np.arange(vh) + 0.5) * h / vh, h - 1).astype(int)
        cols = np.minimum((np.arange(vw) + 0.5) * w / vw, w - 1).astype(int)
        logits = np.full((256, 256), -8.0, dtype=np.float32)
        logits[:vh, :vw] = np.where(mask[rows][:, cols], 8.0, -8.0)
        from .propagation import bounding_box_xyxy

        box = bounding_box_xyxy(mask) if mask.any() else None
        return SlicePrediction(z=int(z), mask_yx=mask, logits_256=logits, iou=1.0,
                               prompt={"box_xyxy": None if box is None else np.asarray(box, dtype=np.float32)})

    def rename(self, label_id: int, name: str) -> None:
        """Rename an object; an empty name is refused with a sentence."""
        self._require(label_id)
        if not str(name).strip():
            raise ValueError("An object needs a name: type at least one character.")
        self.labels.objects[label_id].name = str(name).strip()

    def remove_seed(self, label_id: int, z: int) -> None:
        self.seeds.get(label_id, {}).pop(z, None)

    # ------------------------------------------------------------------ volume
    def propagate(self, label_id: int, direction: str = "both", mode: str | None = None,
                  stop: StopRules | None = None, cancel: threading.Event | None = None,
                  from_slice: int | None = None) -> Generator[Progress, None, PropagationResult]:
        """Propagate an object from its seeds; commits to the labels only when it finishes.

        from_slice: re-propagate after a correction on that (seeded) slice only: walk outwards
            from it until the new masks agree with the existing result or reach another seed,
            and change only the slices in between. Without it, the whole object is redone from
            all its seeds.
        A cancelled or failed run leaves the labels exactly as they were.
        """
        self._require(label_id)
        seeds = self.seeds.get(label_id) or {}
        if not seeds:
            raise ValueError(f"Object {label_id} has no segmented slice yet: prompt it on one slice first.")
        predictor = self.predictor
        stop = stop or self.stop_rules
        if stop.policy is None:  # each model ends its walks by the rule measured for it
            from .propagation import policy_for_model

            stop = dataclasses.replace(stop, policy=policy_for_model(getattr(predictor, "spec", None)))
        marked = set(self.stop_slices.get(label_id, set()))
        current = self.labels.array == label_id
        if from_slice is not None:
            if from_slice not in seeds:
                raise ValueError(f"Slice {from_slice} is not a segmented slice of object {label_id}.")
            marked |= set(seeds) - {from_slice}  # other seeds stay as the user made them
            stop = dataclasses.replace(stop, agree_with=current)
            labels = (seeds[from_slice].prompt or {}).get("point_labels")
            present = np.flatnonzero(current.any(axis=(1, 2)))
            if labels is not None and len(labels) and int(np.asarray(labels).ravel()[-1]) == 0 and present.size:
                # A background click says "less here": its re-propagation may reshape the object's
                # slices but not make it longer (one on BraTS 2021 walked 24 slices past the lesion).
                lo, hi = int(present[0]), int(present[-1])
                if stop.z_range is not None:
                    lo, hi = max(lo, stop.z_range[0]), min(hi, stop.z_range[1])
                stop = dataclasses.replace(stop, z_range=(lo, hi))
            seeds = {from_slice: seeds[from_slice]}
        if marked:
            stop = dataclasses.replace(stop, stop_slices=frozenset(set(stop.stop_slices) | marked))
        result = yield from propagate(predictor, seeds, mode=mode or self.mode, stop=stop,
                                      direction=direction, cancel=cancel, candidates=self.candidates)
        # A cancel that came after the last slice still wins: nothing is committed.
        if cancel is not None and cancel.is_set():
            from .propagation import PropagationCancelled

            raise PropagationCancelled("Propagation was cancelled; nothing was changed.")
        if from_slice is not None:
            masks = {z: p.mask_yx for z, p in result.predictions.items()}
        else:
            order = sorted(seeds)
            n = self.shape_zyx[0]
            if direction == "both":
                affected = range(n)
            elif direction == "up":
                affected = range(order[0], n)
            else:
                affected = range(0, order[-1] + 1)
            empty = np.zeros(self.shape_zyx[1:], dtype=bool)
            masks = {z: (result.predictions[z].mask_yx if z in result.predictions else empty) for z in affected}
            # Only slices that held this object or gain it need rewriting.
            holds = current.any(axis=(1, 2))
            masks = {z: m for z, m in masks.items() if holds[z] or m.any()}
        masks = self._apply_edits(label_id, masks)
        self._commit(label_id, masks, what=f"propagate {label_id}")
        self._propagated.setdefault(label_id, {}).update(result.predictions)
        if from_slice is None:  # the whole object was redone: older scores no longer apply
            self._confidence[label_id], self.signals[label_id] = {}, {}
        self._confidence.setdefault(label_id, {}).update(result.confidence)
        self.signals.setdefault(label_id, {}).update(result.signals)
        self.stopped[label_id] = dict(result.stopped)
        return result

    def stop_here(self, label_id: int, z: int) -> int:
        """The object ends before slice z: mark it, and erase the object from z outwards (undoable).

        "Outwards" is away from the object's seeds; returns the number of voxels erased.
        """
        self._require(label_id)
        self.mark_stop(label_id, z)
        seeds = sorted(self.seeds.get(label_id, {}))
        n = self.shape_zyx[0]
        if seeds and all(s < z for s in seeds):
            beyond = range(z, n)
        elif seeds and all(s > z for s in seeds):
            beyond = range(0, z + 1)
        else:
            beyond = range(z, z + 1)
        changed = self.labels.clear_object(label_id, beyond)
        for s in beyond:
            self.seeds.get(label_id, {}).pop(s, None)
            self.edits.get(label_id, {}).pop(s, None)  # the object ends here: no hand edits come back
            self.overlaps.get(label_id, {}).pop(s, None)
        return changed

    def undo(self) -> str | None:
        return self.labels.undo()

    def redo(self) -> str | None:
        return self.labels.redo()

    # ------------------------------------------------------------------ export
    def labels_ijk(self) -> np.ndarray:
        """The label volume in the source file's voxel grid (uint8, or uint16 past 254)."""
        return self.view.from_view(self.labels.export_array())

    def save(self, path, per_object_dir=None) -> list:
        """Write the label map (and sidecars) aligned with the source scan; returns paths written."""
        from ..io import write_label_map

        names = self.labels.names()
        colors = {k: o.color for k, o in self.labels.objects.items()}
        spec = getattr(self._predictor, "spec", None)
        model_name = spec.name if spec is not None else str(self.model_name)
        written = [write_label_map(path, self.labels_ijk(), self.volume, names=names, colors=colors,
                                   model_name=model_name)]
        overlapping = self.overlap == "allow" and any(any(m.any() for m in by_z.values())
                                                      for by_z in self.overlaps.values())
        if per_object_dir is None and overlapping:
            # one label map cannot hold overlaps: each object's own file carries them
            from pathlib import Path

            per_object_dir = Path(path).parent / f"{Path(path).name.split('.')[0]}_objects"
        if per_object_dir is not None:
            from ..io.writers import write_label_maps_per_object

            for label_id in sorted(self.labels.objects):
                mask = self.object_mask(label_id)
                if not mask.any():
                    continue  # an empty object gets no empty file; the caller reports it
                own = self.view.from_view(mask.astype(np.uint16) * label_id)
                written += list(write_label_maps_per_object(per_object_dir, own, self.volume, names=names,
                                                            colors=colors, ids=[label_id]).values())
        return written
