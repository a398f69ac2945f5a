"""MONAI transforms of the fine-tuning pipeline: each a small array transform with a ``...d`` twin.

The deterministic chain (cached by ``CacheDataset``) is::

    LoadImaged -> EnsureChannelFirstd -> CheckCased -> Orientationd("RAS") -> ToSliceViewd
    -> WindowIntensityd -> LabelledSlicesd -> EncodeSlicesd (only with a frozen image encoder)

and the random step, applied to (target slice, neighbour slice) pairs after caching, is
``SimulatePromptsd``. Frames: after ``ToSliceViewd`` the arrays are ``(Z, H, W)`` in the engine's
radiological view (``io/orientation.py``); everything handed to the model is in the 256x256
model-input frame (slice resized so its longest side is 256, top-left, zero-padded).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform

from ..engine.preprocessing import SliceGeometry, normalize_volume
from ..engine.propagation import bounding_box_xyxy, interior_point_yx, largest_error_region, prompt_from_previous
from ..io.orientation import LETTER_TO_WORLD, VIEW_AXCODES  # the engine's views: one home for their axis codes

LOWRES = 256  # side of the decoder's low-res logits, and of LiteMedSAM's input
DEFAULT_MIN_AREA = 10  # pixels: a slice with less of an object does not count as labelled


class DataError(ValueError):
    """A case of the datalist cannot be used; the message names the case and what to do."""


def _array(x) -> np.ndarray:
    """MetaTensor / tensor / array -> numpy array (no copy when possible)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------------ validation
class CheckCase(Transform):
    """Fail fast, naming the case, when an image and its label do not belong together or the label
    holds values the datalist does not declare, or none of the objects to train on.

    Args:
        allowed: label values the datalist declares (background 0 is always allowed).
        atol: tolerance on the affines, in mm.
    """

    def __init__(self, allowed: Sequence[int] | None = None, atol: float = 1e-3) -> None:
        self.allowed = None if allowed is None else {int(v) for v in allowed} | {0}
        self.atol = atol

    def __call__(self, image, label, case: str, objects: Sequence[int] | None = None) -> None:
        img, lab = _array(image), _array(label)
        if img.shape[-3:] != lab.shape[-3:]:
            raise DataError(
                f"Case '{case}': the image has shape {img.shape[-3:]} but its label has {lab.shape[-3:]}. "
                "They must be on the same voxel grid: resample the label to the image, or fix the datalist entry."
            )
        a_img, a_lab = getattr(image, "affine", None), getattr(label, "affine", None)
        if a_img is not None and a_lab is not None and not np.allclose(_array(a_img), _array(a_lab), atol=self.atol):
            raise DataError(
                f"Case '{case}': the image and its label have different affines (voxel-to-world geometry), "
                f"image\n{np.round(_array(a_img), 3)}\nlabel\n{np.round(_array(a_lab), 3)}\n"
                "Resample the label onto the image grid, or check that the files belong together."
            )
        values = np.unique(lab)
        if not np.allclose(values, np.round(values)):
            raise DataError(f"Case '{case}': the label map holds non-integer values; give an integer label map.")
        values = [int(v) for v in np.round(values)]
        if len(values) == 1 and values[0] == 0:
            raise DataError(f"Case '{case}': the label map is empty (all zero). Remove the case or fix its label file.")
        if self.allowed is not None:
            unknown = [v for v in values if v not in self.allowed]
            if unknown:
                raise DataError(
                    f"Case '{case}': the label map holds value(s) {unknown} that the datalist's 'labels' do not "
                    f"declare (declared: {sorted(self.allowed)}). Add them to 'labels' or fix the label file."
                )
        if objects is not None:
            absent = [int(o) for o in objects if int(o) not in values]
            if len(absent) == len(list(objects)):
                raise DataError(
                    f"Case '{case}': none of the labels to train on ({sorted(int(o) for o in objects)}) occur in its "
                    f"label map (present: {[v for v in values if v]}). Remove the case or choose other labels."
                )


class CheckCased(MapTransform):
    """Dictionary twin of `CheckCase`: checks ``image``/``label`` keys; the case name is in ``case``."""

    def __init__(self, keys: KeysCollection = ("image", "label"), allowed: Sequence[int] | None = None,
                 atol: float = 1e-3) -> None:
        super().__init__(keys)
        self.checker = CheckCase(allowed, atol)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image_key, label_key = self.keys[0], self.keys[1]
        allowed = d.get("labels_allowed")
        checker = self.checker if allowed is None else CheckCase(allowed, self.checker.atol)
        checker(d[image_key], d[label_key], str(d.get("case", "?")), d.get("objects"))
        return d


# ------------------------------------------------------------------------------ geometry

class ToSliceView(Transform):
    """(C, X, Y, Z) array in RAS orientation -> (C, Z, H, W) in the engine's radiological view.

    Pure flips and a transpose, the same view `io.SliceView` gives for a non-oblique volume:
    axial = (inferior->superior, anterior->posterior, right->left).
    """

    def __init__(self, axis: str = "axial") -> None:
        if axis not in VIEW_AXCODES:
            raise ValueError(f"axis must be one of {sorted(VIEW_AXCODES)}; got {axis!r}.")
        self.axis = axis

    def __call__(self, img) -> np.ndarray:
        arr = _array(img)  # C,X,Y,Z (RAS)
        order, flips = [], []
        for letter in VIEW_AXCODES[self.axis]:
            ras_axis, sign = LETTER_TO_WORLD[letter]
            order.append(ras_axis + 1)
            if sign < 0:
                flips.append(ras_axis + 1)
        if flips:
            arr = np.flip(arr, axis=tuple(flips))
        return np.ascontiguousarray(arr.transpose(0, *order))  # C,Z,H,W


class ToSliceViewd(MapTransform):
    """Dictionary twin of `ToSliceView`."""

    def __init__(self, keys: KeysCollection, axis: str = "axial") -> None:
        super().__init__(keys)
        self.t = ToSliceView(axis)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.t(d[key])
        return d


# ------------------------------------------------------------------------------ intensity
class WindowIntensity(Transform):
    """(C, Z, H, W) raw intensities -> (Z, H, W) uint8, exactly as the engine normalises at inference
    (`engine.preprocessing.normalize_volume`): CT window (default abdomen 40/400) or MR 0.5-99.5
    percentiles of the non-zero voxels."""

    def __init__(self, modality: str = "auto", window=None) -> None:
        self.modality, self.window = modality, window

    def __call__(self, img, modality: str | None = None) -> np.ndarray:
        arr = _array(img)
        arr = arr[0] if arr.ndim == 4 else arr
        modality = modality or self.modality
        if modality is None or str(modality).lower() in ("auto", "unknown", ""):
            from ..io.volume import guess_modality

            modality = guess_modality(arr)
        return normalize_volume(arr, modality, self.window)


class WindowIntensityd(MapTransform):
    """Dictionary twin of `WindowIntensity`; a per-case ``modality`` key overrides the default."""

    def __init__(self, keys: KeysCollection = "image", modality: str = "auto", window=None,
                 modality_key: str = "modality") -> None:
        super().__init__(keys)
        self.t = WindowIntensity(modality, window)
        self.modality_key = modality_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.t(d[key], d.get(self.modality_key))
        return d


class LabelledSlicesd(MapTransform):
    """Squeeze the label to (Z, H, W) uint16 and record, per object, the slices that hold it.

    Adds ``slices``: {label id: sorted list of z with at least `min_area` pixels of it}.
    The objects are the case's ``objects`` (or `objects` here, or every non-zero value).
    """

    def __init__(self, keys: KeysCollection = "label", objects: Sequence[int] | None = None,
                 min_area: int = DEFAULT_MIN_AREA) -> None:
        super().__init__(keys)
        self.objects = objects
        self.min_area = min_area

    def __call__(self, data):
        d = dict(data)
        key = self.keys[0]
        lab = _array(d[key])
        lab = lab[0] if lab.ndim == 4 else lab
        lab = np.rint(lab).astype(np.uint16)
        d[key] = lab
        objects = d.get("objects") or self.objects
        if objects is None:
            objects = [int(v) for v in np.unique(lab) if v != 0]
        slices = {}
        for obj in objects:
            areas = (lab == int(obj)).sum(axis=(1, 2))
            zs = [int(z) for z in np.flatnonzero(areas >= self.min_area)]
            if zs:
                slices[int(obj)] = zs
        if not slices:
            raise DataError(f"Case '{d.get('case', '?')}': no slice holds at least {self.min_area} pixels of the "
                            f"labels {sorted(int(o) for o in objects)}; nothing to train on.")
        d["slices"] = slices
        return d


def slices_to_embed(slices: Mapping[int, Sequence[int]], n_slices: int, margin: int = 1) -> list[int]:
    """Every slice that holds an object, plus `margin` slices either side (the walk's overshoot)."""
    out: set[int] = set()
    for zs in slices.values():
        for z in zs:
            out.update(range(max(0, z - margin), min(n_slices, z + margin + 1)))
    return sorted(out)


class EncodeSlicesd(MapTransform):
    """Run the frozen image encoder once on every slice that training can visit.

    Adds ``embeddings`` {z: (256, 64, 64) float16 array}. With `cache_dir`, each slice's embedding
    is also kept on disk, in the engine's self-checking entries (`engine.embedding_cache.
    cached_embeddings`: `<signature of (model key, slice pixels)>.emb`), so a second run, or the
    other ranks of a distributed run, read it instead of encoding again.

    Args:
        encode: callable (B, H, W) uint8 slices -> (B, 256, 64, 64) float32 array.
        model_key: the embeddings' identity (`engine.predictor.model_key`: encoder weights, encoder
            path and preprocessing).
        margin: slices either side of the labelled ones to embed too.
        cache_dir: optional folder for the on-disk cache.
        progress: optional callable(n_done, n_total, case) after each batch of slices.
    """

    def __init__(self, keys: KeysCollection = "image", encode: Callable | None = None, model_key: str = "",
                 margin: int = 1, cache_dir: str | os.PathLike | None = None, batch_size: int = 1,
                 progress: Callable | None = None) -> None:
        super().__init__(keys)
        self.encode = encode
        self.model_key = model_key
        self.margin = margin
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = max(1, int(batch_size))
        self.progress = progress

    def __call__(self, data):
        from ..engine.embedding_cache import cached_embeddings

        d = dict(data)
        vol = d[self.keys[0]]
        zs = slices_to_embed(d["slices"], vol.shape[0], self.margin)
        report = None
        if self.progress is not None:
            case = str(d.get("case", ""))
            report = lambda n, total: self.progress(n, total, case)  # noqa: E731
        embeddings = cached_embeddings([vol[z] for z in zs], self.encode, self.model_key, self.cache_dir,
                                       self.batch_size, report)
        d["embeddings"] = dict(zip(zs, embeddings))
        return d


# ------------------------------------------------------------------------------ prompts
def mask_to_lowres(mask_yx: np.ndarray, geom: SliceGeometry, size: int = LOWRES) -> np.ndarray:
    """(H, W) bool slice mask -> (size, size) float32 {0, 1} in the model-input frame (resized so the
    longest side is `size`, top-left, zero padding), the frame of the decoder's low-res logits."""
    import torch
    import torch.nn.functional as F

    factor = size / geom.image_size
    new_h, new_w = (max(1, int(round(v * factor))) for v in geom.new_hw)
    m = torch.as_tensor(np.ascontiguousarray(mask_yx), dtype=torch.float32)[None, None]
    if (new_h, new_w) != tuple(mask_yx.shape):
        m = F.interpolate(m, size=(new_h, new_w), mode="bilinear", align_corners=False,
                          antialias=new_h < mask_yx.shape[0])
    out = np.zeros((size, size), np.float32)
    out[:new_h, :new_w] = (m[0, 0].numpy() >= 0.5)
    return out


def slice_to_model_image(slice_u8: np.ndarray, image_size: int = LOWRES, normalization: str = "minmax01") -> np.ndarray:
    """(H, W) uint8 -> (3, S, S) float32 encoder input, exactly as the engine prepares it."""
    from ..engine.preprocessing import slices_to_model_input

    x, _ = slices_to_model_input(slice_u8[None], image_size, normalization)
    return x[0].numpy()


class SimulatePromptsd(Randomizable, MapTransform):
    """(case, object, target slice t, neighbour slice n) -> everything a training step needs to
    build the prompts that propagation and an expert produce for slice t.

    The input dict holds ``case`` (index into `cases`), ``label``, ``t``, ``n``; `cases` are the
    cached case dicts (``image`` (Z,H,W) uint8, ``label`` (Z,H,W), ``embeddings`` {z: array}).
    Output (all in the 256x256 model-input frame, xy pixels; float32 unless noted):

    - ``embedding_t``, ``embedding_n``: (256, 64, 64), or ``image_t``/``image_n`` (3, S, S)
      when the encoder runs in the step (`with_images`).
    - ``target``: (1, 256, 256) {0, 1} ground truth of t; ``nb_mask``: the same for n.
    - ``box_t``: (4,) xyxy the expert's box on t (GT box, jittered), or n's when t is empty.
    - ``box_n_seed``: (4,) n's GT box, jittered (to predict n the way a seed slice is predicted).
    - ``box_prop``: (4,) n's mask box widened by 3 px at 256 scale: the box propagation gives t.
    - ``point_prop``: (1, 2) n's deepest interior point: the point propagation gives t.
    - ``click``: (1, 2) and ``click_label`` (1,) int64: a corrective click at the centre of the
      largest region where t's truth and n's mask disagree (1 = add, 0 = remove).
    - ``mask_scale``: () the +/- magnitude for a ground-truth dense prompt.
    """

    def __init__(self, cases: Sequence[Mapping], image_size: int = LOWRES, jitter: float = 0.1,
                 max_shift_px: float = 5.0, with_images: bool = False, normalization: str = "minmax01") -> None:
        MapTransform.__init__(self, keys=["t"], allow_missing_keys=True)
        self.cases = cases
        self.image_size = image_size
        self.jitter = jitter
        self.max_shift_px = max_shift_px
        self.with_images = with_images
        self.normalization = normalization
        self._geoms: dict[tuple[int, int], SliceGeometry] = {}

    def randomize(self, data=None) -> None:
        self._u = self.R.uniform(size=16)

    def _geom(self, hw) -> SliceGeometry:
        key = tuple(int(v) for v in hw)
        if key not in self._geoms:
            self._geoms[key] = SliceGeometry(key[0], key[1], self.image_size)
        return self._geoms[key]

    def _jitter_box(self, box_xyxy: np.ndarray, hw, u: np.ndarray) -> np.ndarray:
        """Randomly grow/shrink each side by up to `jitter` of the box size plus a few pixels."""
        x0, y0, x1, y1 = box_xyxy
        w, h = x1 - x0 + 1, y1 - y0 + 1
        d = (u[:4] * 2 - 1)
        out = np.array([x0 - d[0] * (self.jitter * w + self.max_shift_px * u[4]),
                        y0 - d[1] * (self.jitter * h + self.max_shift_px * u[4]),
                        x1 + d[2] * (self.jitter * w + self.max_shift_px * u[4]),
                        y1 + d[3] * (self.jitter * h + self.max_shift_px * u[4])], dtype=np.float32)
        out[[0, 2]] = np.clip(out[[0, 2]], 0, hw[1] - 1)
        out[[1, 3]] = np.clip(out[[1, 3]], 0, hw[0] - 1)
        if out[2] < out[0]:
            out[[0, 2]] = out[[2, 0]]
        if out[3] < out[1]:
            out[[1, 3]] = out[[3, 1]]
        return out

    def __call__(self, data):
        self.randomize()
        u = self._u
        d = dict(data)
        case = self.cases[int(d["case"])]
        label, t, n = int(d["label"]), int(d["t"]), int(d["n"])
        vol = case["image"]
        hw = vol.shape[1:]
        geom = self._geom(hw)
        gt_t = case["label"][t] == label
        gt_n = case["label"][n] == label
        out = {"case": int(d["case"]), "label": label, "t": t, "n": n}
        if self.with_images:
            out["image_t"] = slice_to_model_image(vol[t], self.image_size, self.normalization)
            out["image_n"] = slice_to_model_image(vol[n], self.image_size, self.normalization)
        else:
            out["embedding_t"] = np.asarray(case["embeddings"][t], dtype=np.float32)
            out["embedding_n"] = np.asarray(case["embeddings"][n], dtype=np.float32)
        out["target"] = mask_to_lowres(gt_t, geom)[None]
        out["nb_mask"] = mask_to_lowres(gt_n, geom)[None]
        box_n = bounding_box_xyxy(gt_n)
        box_t = bounding_box_xyxy(gt_t)
        out["box_t"] = geom.box_to_model(self._jitter_box(box_t if box_t is not None else box_n, hw, u[0:5]))
        out["box_n_seed"] = geom.box_to_model(self._jitter_box(box_n, hw, u[5:10]))
        # exactly what engine/propagation.py gives slice t from a previous mask equal to n's truth
        prop = prompt_from_previous(SimpleNamespace(mask_yx=gt_n, logits_256=None), "box+points", hw)
        out["box_prop"] = geom.box_to_model(prop["box_xyxy"])
        out["point_prop"] = geom.coords_to_model(np.asarray(prop["points_yx"], np.float32)[:, ::-1])
        click_yx, click_label = self._click(gt_t, gt_n)
        out["click"] = geom.coords_to_model(click_yx[None, ::-1].astype(np.float32))
        out["click_label"] = np.array([click_label], dtype=np.int64)
        out["mask_scale"] = np.float32(2.0 + 10.0 * u[10])
        return out

    @staticmethod
    def _click(gt_t: np.ndarray, prev: np.ndarray) -> tuple[np.ndarray, int]:
        """Centre of the largest disagreement between the truth and a previous mask, and its label."""
        error = largest_error_region(gt_t, prev)
        if error is None:  # nothing to correct: a confirming click inside the object
            if gt_t.any():
                return interior_point_yx(gt_t), 1
            return interior_point_yx(~prev), 0
        region, kind = error
        return interior_point_yx(region), kind
