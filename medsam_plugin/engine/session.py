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
        self.seeds.pop(label_id, None)
        self.stop_slices.pop(label_id, None)
        self._propagated.pop(label_id, None)
        for per_object in (self._confidence, self.signals, self.stopped):
            per_object.pop(label_id, None)

    def clear_object(self, label_id: int) -> int:
        """Erase an object's voxels and seeds (undoable); the object itself stays in the list."""
        self._require(label_id)
        changed = self.labels.clear_object(label_id)
        self.seeds[label_id] = {}
        self._propagated.pop(label_id, None)
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
        return {label: dict(by_z) for label, by_z in self.seeds.items()}

    def _restore_seeds(self, snapshot: dict) -> None:
        self.seeds = {label: dict(by_z) for label, by_z in snapshot.items()}

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
        self.labels.commit(label_id, {pred.z: pred.mask_yx}, what=f"segment {label_id} on slice {pred.z}")
        self.seeds.setdefault(label_id, {})[pred.z] = pred

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
        marked = set(self.stop_slices.get(label_id, set()))
        current = self.labels.array == label_id
        if from_slice is not None:
            if from_slice not in seeds:
                raise ValueError(f"Slice {from_slice} is not a segmented slice of object {label_id}.")
            marked |= set(seeds) - {from_slice}  # other seeds stay as the user made them
            stop = dataclasses.replace(stop, agree_with=current)
            seeds = {from_slice: seeds[from_slice]}
        if marked:
            stop = dataclasses.replace(stop, stop_slices=frozenset(set(stop.stop_slices) | marked))
        result = yield from propagate(predictor, seeds, mode=mode or self.mode, stop=stop,
                                      direction=direction, cancel=cancel, candidates=self.candidates)
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
        self.labels.commit(label_id, masks, what=f"propagate {label_id}")
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
        model_name = self.predictor.spec.name if self.model_loaded else str(self.model_name)
        written = [write_label_map(path, self.labels_ijk(), self.volume, names=names, colors=colors,
                                   model_name=model_name)]
        if per_object_dir is not None:
            from ..io.writers import write_label_maps_per_object

            written += list(write_label_maps_per_object(per_object_dir, self.labels_ijk(), self.volume,
                                                        names=names, colors=colors))
        return written
