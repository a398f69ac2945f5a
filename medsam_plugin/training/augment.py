"""Augmented copies of training slices, applied alike to a slice and its labels.

A `SliceAugment` is one random draw of: a flip, a 90-degree turn, a zoom (crop in, or pad out)
and, for the image only, a gamma and contrast change. It works on (H, W) arrays in the engine's
slice frame; `label_to_lowres` then puts a label slice into the 256x256 model-input frame the
decoder's logits live in (longest side 256, top-left, zero padding), as the engine does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOWRES = 256


@dataclass(frozen=True)
class SliceAugment:
    """One augmentation draw. flip: mirror columns; turns: quarter turns; zoom > 1 crops in
    (centre at `centre` in [0, 1]^2 of the free range), < 1 pads out; gamma/contrast: image only."""

    flip: bool = False
    turns: int = 0
    zoom: float = 1.0
    centre: tuple[float, float] = (0.5, 0.5)
    gamma: float = 1.0
    contrast: float = 1.0

    @staticmethod
    def identity() -> "SliceAugment":
        return SliceAugment()

    @staticmethod
    def random(rng: np.random.Generator, modality: str = "CT") -> "SliceAugment":
        zoom = float(rng.choice([rng.uniform(1.1, 1.6), rng.uniform(0.75, 0.95), 1.0], p=[0.5, 0.25, 0.25]))
        return SliceAugment(
            flip=bool(rng.uniform() < 0.5),
            turns=int(rng.integers(0, 4)),
            zoom=zoom,
            centre=(float(rng.uniform()), float(rng.uniform())),
            gamma=float(np.exp(rng.uniform(np.log(0.6), np.log(1.6)))),
            contrast=float(rng.uniform(0.7, 1.3)),
        )

    # -- geometry -------------------------------------------------------------------------------
    def _geometry(self, a: np.ndarray, order: int) -> np.ndarray:
        from scipy.ndimage import zoom as nd_zoom

        if self.flip:
            a = a[:, ::-1]
        if self.turns:
            a = np.rot90(a, self.turns)
        if self.zoom != 1.0:
            h, w = a.shape
            if self.zoom > 1.0:  # crop a window of 1/zoom the size, scale it back up
                ch, cw = max(8, int(round(h / self.zoom))), max(8, int(round(w / self.zoom)))
                y0 = int(round((h - ch) * self.centre[0]))
                x0 = int(round((w - cw) * self.centre[1]))
                a = a[y0:y0 + ch, x0:x0 + cw]
                a = nd_zoom(a, (h / a.shape[0], w / a.shape[1]), order=order, mode="nearest", grid_mode=True)
            else:  # shrink and pad: the object appears smaller
                small = nd_zoom(a, self.zoom, order=order, mode="nearest", grid_mode=True)
                out = np.zeros((h, w), a.dtype)
                y0 = int(round((h - small.shape[0]) * self.centre[0]))
                x0 = int(round((w - small.shape[1]) * self.centre[1]))
                out[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small[: h - y0, : w - x0]
                a = out
        return np.ascontiguousarray(a)

    def apply_image(self, slice_u8: np.ndarray) -> np.ndarray:
        """(H, W) uint8 -> augmented uint8 (shape (W, H) after an odd number of turns)."""
        a = self._geometry(np.asarray(slice_u8), order=1).astype(np.float32) / 255.0
        if self.gamma != 1.0:
            a = a ** self.gamma
        if self.contrast != 1.0:
            a = (a - a.mean()) * self.contrast + a.mean()
        return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)

    def apply_label(self, label: np.ndarray) -> np.ndarray:
        """(H, W) integer labels -> the same geometry as `apply_image`, nearest neighbour."""
        return self._geometry(np.asarray(label), order=0)


def label_to_lowres(label_hw: np.ndarray, size: int = LOWRES) -> np.ndarray:
    """(H, W) integer labels -> (size, size) uint16 in the model-input frame (nearest neighbour)."""
    h, w = label_hw.shape
    scale = size / max(h, w)
    new_h, new_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    rows = np.minimum(((np.arange(new_h) + 0.5) / scale).astype(int), h - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) / scale).astype(int), w - 1)
    out = np.zeros((size, size), np.uint16)
    out[:new_h, :new_w] = np.asarray(label_hw)[rows][:, cols]
    return out
