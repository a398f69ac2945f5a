"""The stateful slice predictor: owns one volume's slices and their cached embeddings.

Like SAM's `SamPredictor`, but for a stack of slices: `set_volume` once, then `predict` on any
slice. The first prompt on a slice encodes it; every later prompt on that slice only runs the
prompt encoder and mask decoder.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .embedding_cache import EmbeddingCache, slice_signature
from .preprocessing import SliceGeometry, logits_to_mask, slices_to_model_input

log = logging.getLogger(__name__)

DECODER_ENV_VAR = "MEDSAM_DECODER"
DECODERS = ("fast", "reference")
# Prompt-independent decoder state kept for this many slices (14 MiB each): the slice being
# clicked on and the one before it.
STATE_SLOTS = 2


def model_key(spec, encoder=None) -> str:
    """The one identity of a model's embeddings: model, preprocessing and the encoder path.

    Every embedding cache (the engine's, fine-tuning's) names its entries by this key. The model's
    own fp32 encoder (`encoder` None) keeps the plain key (so earlier disk caches stay valid); a
    fast path (bf16, OpenVINO, compiled...) adds its own `key`, so its embeddings never mix with
    fp32 ones.
    """
    key = getattr(spec, "embedding_key", "") or \
        f"{spec.name}:{getattr(spec, 'sha256', None)}:{spec.image_size}:{spec.normalization}"
    if encoder is not None:
        key += ":" + str(getattr(encoder, "key", None) or f"encoder={type(encoder).__module__}.{type(encoder).__qualname__}")
    return key


def encode_slices(loaded, slices_u8: np.ndarray, encoder: Callable | None = None) -> np.ndarray:
    """The one path from slices to embeddings: (B, H, W) uint8 windowed slices -> the model's
    preprocessing (`slices_to_model_input`) -> the image encoder (`encoder`, a fast path from
    `model.fast.make_encoder`, else the model's own) -> (B, 256, 64, 64) float32 numpy.

    `SlicePredictor` and fine-tuning both encode through this, so training sees the embeddings
    inference computes.
    """
    import torch

    x, _ = slices_to_model_input(np.asarray(slices_u8), loaded.spec.image_size, loaded.spec.normalization)
    x = x.to(loaded.device)
    with torch.inference_mode():
        emb = encoder(x) if encoder is not None else loaded.sam.image_encoder(x)
    return emb.float().cpu().numpy()


@dataclass
class SlicePrediction:
    """The model's answer for one prompt on one slice.

    mask_yx: (H, W) bool, the chosen mask.
    logits_256: (256, 256) float32 low-res logits of the chosen mask (feed back as a mask prompt).
    iou: the model's predicted IoU of the chosen mask.
    all_masks_yx / all_ious / all_logits_256: every candidate when multimask output was asked for.
    """

    z: int
    mask_yx: np.ndarray
    logits_256: np.ndarray
    iou: float
    all_masks_yx: np.ndarray | None = None
    all_ious: np.ndarray | None = None
    all_logits_256: np.ndarray | None = None
    prompt: dict = field(default_factory=dict)


class SlicePredictor:
    """Encodes slices of one (Z, H, W) uint8 volume on demand and decodes prompts on them.

    Args:
        loaded: a `medsam_plugin.model.registry.LoadedModel`.
        cache: where embeddings live; a fresh in-memory cache when None.
        encoder: optional callable (B,3,S,S) float tensor -> (B,256,64,64) embeddings, to swap in
            a faster inference path (bf16, compiled); defaults to the model's own image encoder.
        decoder: "fast" (default; `model.fast_decoder.FastMaskDecoder`, same fp32 maths, keeps
            each slice's prompt-independent work) or "reference" (the model's own mask decoder).
            The environment variable MEDSAM_DECODER overrides the default.
    """

    def __init__(self, loaded, cache: EmbeddingCache | None = None, encoder: Callable | None = None,
                 decoder: str | None = None):
        self.loaded = loaded
        self.sam = loaded.sam
        self.spec = loaded.spec
        self.device = loaded.device
        self.cache = cache if cache is not None else EmbeddingCache()
        self._encoder = encoder
        self._volume: np.ndarray | None = None
        self._geom: SliceGeometry | None = None
        self._dense_pe = None
        self.encode_count = 0
        self.decode_count = 0  # prompts decoded
        self.decoder_calls = 0  # mask decoder runs (`predict_many` decodes several prompts in one)
        decoder = decoder or os.environ.get(DECODER_ENV_VAR, "").strip().lower() or "fast"
        if decoder not in DECODERS:
            raise ValueError(f"Unknown decoder {decoder!r}; use one of {', '.join(DECODERS)} "
                             f"(argument or {DECODER_ENV_VAR}).")
        self.decoder_name = decoder
        self._fast_decoder = None  # built on first use (needs the positional encoding)
        self._states: OrderedDict = OrderedDict()  # z -> (cached embedding object, SliceState)
        self._states_lock = threading.Lock()

    # ------------------------------------------------------------------ volume and embeddings
    @property
    def model_key(self) -> str:
        """Identifies the embeddings' numerics: model, preprocessing and the encoder path (`model_key`)."""
        return model_key(self.spec, self._encoder)

    @property
    def preferred_batch(self) -> int:
        """Slices per encoder call that the encoder path measured fastest (8 for OpenVINO and CUDA, 1 for torch on CPU)."""
        return max(1, int(getattr(self._encoder, "preferred_batch", 1) or 1))

    def set_volume(self, volume_u8_zyx: np.ndarray, signatures: bool | None = None) -> None:
        """Take a preprocessed (Z, H, W) uint8 volume; forgets embeddings of any earlier one."""
        volume = np.asarray(volume_u8_zyx)
        if volume.ndim != 3 or volume.dtype != np.uint8:
            raise ValueError(f"set_volume expects a (Z, H, W) uint8 volume; got {volume.shape} {volume.dtype}.")
        self._volume = volume
        self._geom = SliceGeometry(volume.shape[1], volume.shape[2], self.spec.image_size)
        sigs = {}
        if self.cache.disk_dir is not None if signatures is None else signatures:
            sigs = {z: slice_signature(volume[z], self.model_key) for z in range(volume.shape[0])}
        self.cache.reset(sigs)
        with self._states_lock:
            self._states.clear()

    @property
    def volume(self) -> np.ndarray:
        if self._volume is None:
            raise RuntimeError("No volume is set: call SlicePredictor.set_volume(volume_u8_zyx) first.")
        return self._volume

    @property
    def geometry(self) -> SliceGeometry:
        self.volume  # raises the helpful error when unset
        return self._geom

    @property
    def n_slices(self) -> int:
        return self.volume.shape[0]

    def has_embedding(self, z: int) -> bool:
        return z in self.cache

    def _encode(self, zs: Sequence[int]):
        emb = encode_slices(self.loaded, self.volume[list(zs)], self._encoder)
        self.encode_count += len(zs)
        return emb

    def embedding(self, z: int):
        """(1, 256, 64, 64) float32 torch tensor on the model's device for slice z (cached)."""
        import torch

        self._check_z(z)
        value = self.cache.get(z)
        if value is None:
            value = self._encode([z])[0]
            self.cache.put(z, value)
        return torch.as_tensor(np.asarray(value, dtype=np.float32))[None].to(self.device)

    def ensure_embedding(self, z: int) -> bool:
        """Encode slice z now unless it is cached (the long step of a first prompt on a slice), so a
        caller can check for a cancel between encoding and decoding. Returns whether it encoded."""
        self._check_z(z)
        if z in self.cache:
            return False
        self.cache.put(z, self._encode([z])[0])
        return True

    def precompute(self, zs: Sequence[int] | None = None, batch_size: int | None = None) -> Iterator[int]:
        """Encode the slices not cached yet, `batch_size` at a time; yields how many are done.

        batch_size: None picks the encoder path's `preferred_batch`: 8 on CUDA, 1 on the CPU, where
        batches measured no reliably faster per slice (torch and OpenVINO alike).
        """
        batch_size = self.preferred_batch if batch_size is None else max(1, int(batch_size))
        todo = [z for z in (range(self.n_slices) if zs is None else zs) if z not in self.cache]
        done = 0
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for z, value in zip(chunk, self._encode(chunk)):
                self.cache.put(z, value)
            done += len(chunk)
            yield done

    def _check_z(self, z: int) -> None:
        if not 0 <= int(z) < self.n_slices:
            raise IndexError(f"Slice {z} is outside the volume, which has slices 0..{self.n_slices - 1}.")

    # ------------------------------------------------------------------ prompts
    def predict(
        self,
        z: int,
        points_yx: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box_xyxy: Sequence[float] | None = None,
        mask_logits_256: np.ndarray | None = None,
        multimask: bool = False,
    ) -> SlicePrediction:
        """Segment slice z from any combination of prompts.

        Args:
            points_yx: (N, 2) float, (row, col) slice pixels. point_labels: (N,) 1 = fg, 0 = bg.
            box_xyxy: (x0, y0, x1, y1) slice pixels, inclusive corners.
            mask_logits_256: (256, 256) logits from an earlier prediction (dense prompt).
            multimask: return the best of three candidates (by predicted IoU) and all of them.
        """
        import torch

        self._check_z(z)
        points, boxes, masks = self._prompt_tensors(points_yx, point_labels, box_xyxy, mask_logits_256)
        with torch.inference_mode():
            if self.decoder_name == "fast":
                if self._dense_pe is None:
                    self._dense_pe = self.sam.prompt_encoder.get_dense_pe()
                sparse, _ = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
                fast = self._fast()
                state = self._slice_state(z) if masks is None else fast.slice_state(
                    self.embedding(z), dense_tokens=fast.dense_tokens(masks))
                low_res, iou = fast.decode(state, sparse, multimask)
                low_res, iou = low_res[None], iou[None]
            else:  # the model's own prompt encoder + mask decoder, as fine-tuning runs them
                low_res, iou = self.sam.decode(self.embedding(z), points=points, boxes=boxes, masks=masks,
                                               multimask_output=multimask)  # low_res: 1,M,256,256; iou: 1,M
        self.decode_count += 1
        self.decoder_calls += 1
        return self._prediction(z, low_res[0], iou[0], multimask, points_yx, point_labels, box_xyxy, mask_logits_256)

    def predict_many(self, z: int, prompts: Sequence[dict], multimask: bool = False) -> list[SlicePrediction]:
        """Several prompts on slice z in one decoder call; the answers `predict` gives each, in order.

        prompts: dicts of `predict`'s keyword arguments (points_yx, point_labels, box_xyxy,
            mask_logits_256). A correction asks the model several ways at once: one call instead
            of one per way (the fast decoder's `decode_batch`; the reference decoder answers them
            one by one, as the model's own code would).
        """
        import torch

        self._check_z(z)
        prompts = list(prompts)
        if not prompts:
            return []
        if self.decoder_name != "fast" or len(prompts) == 1:
            return [self.predict(z, multimask=multimask, **p) for p in prompts]
        tensors = [self._prompt_tensors(p.get("points_yx"), p.get("point_labels"), p.get("box_xyxy"),
                                        p.get("mask_logits_256")) for p in prompts]
        with torch.inference_mode():
            if self._dense_pe is None:
                self._dense_pe = self.sam.prompt_encoder.get_dense_pe()
            encoder, fast = self.sam.prompt_encoder, self._fast()
            # Prompts that share a mask prompt (the same array) share its dense embedding and the
            # image side of the decoder's first block (`slice_state`).
            states: dict = {}
            sparse_list, state_list = [], []
            for p, (points, boxes, masks) in zip(prompts, tensors):
                sparse, dense = encoder(points=points, boxes=boxes, masks=None)
                sparse_list.append(sparse[0])
                if masks is None:
                    state_list.append(self._slice_state(z))
                    continue
                key = id(p["mask_logits_256"])
                if key not in states:
                    states[key] = fast.slice_state(self.embedding(z), dense_tokens=fast.dense_tokens(masks))
                state_list.append(states[key])
            longest = max(sp.shape[0] for sp in sparse_list)
            sparse = sparse_list[0].new_zeros(len(prompts), longest, sparse_list[0].shape[-1])  # (B, K, D)
            valid = torch.zeros(len(prompts), longest, dtype=torch.bool, device=sparse.device)
            for i, sp in enumerate(sparse_list):
                sparse[i, :sp.shape[0]] = sp
                valid[i, :sp.shape[0]] = True
            low_res, iou = fast.decode_batch(state_list, sparse, valid, multimask)
        self.decode_count += len(prompts)
        self.decoder_calls += 1
        return [self._prediction(z, low_res[i], iou[i], multimask, p.get("points_yx"), p.get("point_labels"),
                                 p.get("box_xyxy"), p.get("mask_logits_256")) for i, p in enumerate(prompts)]

    def _prompt_tensors(self, points_yx, point_labels, box_xyxy, mask_logits_256):
        """The prompts of one `predict`, checked, as the prompt encoder's tensors in the model's frame:
        (points (coords (1, N, 2) xy, labels (1, N)) or None, boxes (1, 4) or None, masks (1, 1, 256, 256) or None)."""
        import torch

        geom = self.geometry
        points = None
        if points_yx is not None and len(points_yx):
            pts_yx = np.asarray(points_yx, dtype=np.float32).reshape(-1, 2)
            labels = np.ones(len(pts_yx), np.int64) if point_labels is None else np.asarray(point_labels, np.int64)
            if labels.shape != (len(pts_yx),):
                raise ValueError(f"Got {len(pts_yx)} points but {labels.size} point labels.")
            self._check_inside(pts_yx, geom, "point")
            coords_xy = geom.coords_to_model(pts_yx[:, ::-1])  # the one (row, col) -> (x, y) swap
            points = type(self.sam).pad_points(torch.as_tensor(coords_xy)[None].to(self.device),
                                               torch.as_tensor(labels)[None].to(self.device), box_xyxy is not None)
        boxes = None
        if box_xyxy is not None:
            box = np.asarray(box_xyxy, dtype=np.float32).reshape(4)
            if not np.all(np.isfinite(box)):
                raise ValueError(f"A box has a corner that is not a finite number ({box.tolist()}); give finite "
                                 f"pixel coordinates.")
            if box[2] < box[0] or box[3] < box[1]:
                raise ValueError(f"A box needs x0 <= x1 and y0 <= y1; got {box.tolist()}.")
            self._check_inside(np.array([[box[1], box[0]], [box[3], box[2]]]), geom, "box corner")
            boxes = torch.as_tensor(geom.box_to_model(box))[None].to(self.device)
        masks = None
        if mask_logits_256 is not None:
            mask_logits = np.asarray(mask_logits_256, dtype=np.float32)
            if not np.all(np.isfinite(mask_logits)):
                raise ValueError("The mask prompt holds values that are not finite numbers; give finite logits.")
            masks = torch.as_tensor(mask_logits).reshape(1, 1, 256, 256).to(self.device)
        if points is None and boxes is None and masks is None:
            raise ValueError("A prediction needs at least one prompt: points, a box, or a mask.")
        return points, boxes, masks

    def _prediction(self, z, low_res, iou, multimask, points_yx, point_labels, box_xyxy, mask_logits_256):
        """A SlicePrediction from one prompt's decoder output: low_res (M, 256, 256), iou (M,)."""
        import torch

        with torch.inference_mode():
            full = logits_to_mask(low_res, self.geometry)  # M,H,W
        ious = iou.float().cpu().numpy()
        masks_yx = (full > 0).cpu().numpy()
        best = int(np.argmax(ious)) if multimask else 0
        return SlicePrediction(
            z=int(z),
            mask_yx=masks_yx[best],
            logits_256=low_res[best].float().cpu().numpy(),
            iou=float(ious[best]),
            all_masks_yx=masks_yx if multimask else None,
            all_ious=ious if multimask else None,
            all_logits_256=low_res.float().cpu().numpy() if multimask else None,
            prompt={"points_yx": points_yx, "point_labels": point_labels, "box_xyxy": box_xyxy,
                    "mask": mask_logits_256 is not None},
        )

    def _fast(self):
        if self._fast_decoder is None:
            from ..model.fast_decoder import FastMaskDecoder

            self._fast_decoder = FastMaskDecoder(self.sam, self._dense_pe)
        return self._fast_decoder

    def _slice_state(self, z: int):
        """The fast decoder's prompt-independent state of slice z, kept while its embedding is."""
        cached = self.cache.get(z)
        with self._states_lock:
            entry = self._states.get(z)
            if entry is not None and cached is not None and entry[0] is cached:
                self._states.move_to_end(z)
                return entry[1]
        state = self._fast().slice_state(self.embedding(z))
        with self._states_lock:
            self._states[z] = (self.cache.get(z), state)
            self._states.move_to_end(z)
            while len(self._states) > STATE_SLOTS:
                self._states.popitem(last=False)
        return state

    @staticmethod
    def _check_inside(points_yx: np.ndarray, geom: SliceGeometry, what: str) -> None:
        pts = np.asarray(points_yx, dtype=np.float64)
        if not np.all(np.isfinite(pts)):  # NaN compares False with every bound: it would pass the test below
            raise ValueError(f"A {what} has a coordinate that is not a finite number ({pts.tolist()}); "
                             f"give finite pixel coordinates.")
        bad = (pts[:, 0] < -0.5) | (pts[:, 0] > geom.height - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > geom.width - 0.5)
        if np.any(bad):
            p = pts[np.argmax(bad)]
            raise ValueError(
                f"A {what} at (row {p[0]:.1f}, col {p[1]:.1f}) lies outside the slice, which is "
                f"{geom.height} rows x {geom.width} cols. Check the prompt's coordinates and frame."
            )
