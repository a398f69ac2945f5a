"""Intensity normalisation and the slice -> model-input geometry.

Everything here is the preprocessing MedSAM and LiteMedSAM were trained with (the MedSAM project,
bowang-lab/MedSAM and its LiteMedSAM branch; Ma et al., Nature Communications 15, 654, 2024): CT
clipped to a window and scaled to 0-255, MR clipped to the 0.5-99.5 percentiles of non-zero voxels,
each slice resized so its longest side equals the model's input size, min-max scaled, zero-padded
bottom/right. SAM's own checkpoints instead take SAM's ImageNet pixel mean/std (`SAM_PIXEL_MEAN`,
`SAM_PIXEL_STD`, kept here as the one home of the constants).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

# (level, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}
MR_PERCENTILES = (0.5, 99.5)
NORMALIZE_CHUNK = 16  # slices per step of normalize_volume

WindowSpec = Union[None, str, Sequence[float]]

# SAM's ImageNet statistics, applied on 0-255 images.
SAM_PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
SAM_PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def parse_window(window: WindowSpec) -> tuple[float, float] | str | None:
    """Turn a user's window choice into (level, width), "mr", or None (choose by modality).

    Accepts a preset name, "mr"/"percentile", "LEVEL,WIDTH" or "LEVEL/WIDTH" text, or a pair.
    """
    if window is None:
        return None
    if isinstance(window, str):
        key = window.strip().lower()
        if key in ("", "auto"):
            return None
        if key in WINDOW_PRESETS:
            return WINDOW_PRESETS[key]
        if key in ("mr", "mri", "percentile"):
            return "mr"
        for sep in (",", "/", ":"):
            if sep in key:
                parts = key.split(sep)
                break
        else:
            parts = []
        try:
            level, width = (float(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"Unknown intensity window {window!r}: use one of {sorted(WINDOW_PRESETS)}, 'mr', "
                "or 'LEVEL,WIDTH' in Hounsfield units (for example '40,400')."
            ) from None
        return _checked_window(level, width)
    level, width = (float(v) for v in window)
    return _checked_window(level, width)


def _checked_window(level: float, width: float) -> tuple[float, float]:
    import math

    if not (math.isfinite(level) and math.isfinite(width)):  # inf/NaN would scale every voxel to one value
        raise ValueError(f"A window's level and width must be finite numbers; got level {level}, width {width}. "
                         f"Use e.g. --window 40,400.")
    if not width > 0:
        raise ValueError(f"A window width must be positive; got level {level}, width {width}.")
    return level, width


def normalize_volume(view_zyx: np.ndarray, modality: str = "CT", window: WindowSpec = None) -> np.ndarray:
    """Scale a volume to uint8 0-255 the way the model was trained.

    Args:
        view_zyx: (Z, H, W) raw intensities (any real dtype).
        modality: "CT", "MR" or "unknown"; picks the default when `window` is None
            (CT -> abdomen window, otherwise MR percentile clipping).
        window: preset name, "mr", (level, width), or None.
    Returns:
        (Z, H, W) uint8.
    """
    choice = parse_window(window)
    if choice is None:
        choice = WINDOW_PRESETS["abdomen"] if str(modality).upper() == "CT" else "mr"
    data = np.asarray(view_zyx)
    if choice == "mr":
        nonzero = data[data != 0]
        if nonzero.size == 0:
            return np.zeros(data.shape, dtype=np.uint8)
        lower, upper = (float(v) for v in np.percentile(nonzero, MR_PERCENTILES))
        del nonzero
    else:
        level, width = choice
        lower, upper = level - width / 2.0, level + width / 2.0
    out = np.zeros(data.shape, dtype=np.uint8)
    if upper <= lower:
        return out
    # A few slices at a time: float temporaries of a 512x512x600 CT would otherwise take GBs.
    for z0 in range(0, data.shape[0], NORMALIZE_CHUNK):
        chunk = data[z0:z0 + NORMALIZE_CHUNK].astype(np.float32)
        scaled = (np.clip(chunk, lower, upper) - lower) * np.float32(255.0 / (upper - lower))
        out[z0:z0 + NORMALIZE_CHUNK] = np.rint(scaled)
        if choice == "mr":
            out[z0:z0 + NORMALIZE_CHUNK][chunk == 0] = 0  # background stays background, as in MedSAM's MR preprocessing
    return out


@dataclass(frozen=True)
class SliceGeometry:
    """How an (H, W) slice sits inside the square model input of side `image_size`.

    The slice is scaled by `scale` to (new_h, new_w), placed top-left, and zero-padded.
    """

    height: int
    width: int
    image_size: int

    @property
    def scale(self) -> float:
        return self.image_size / max(self.height, self.width)

    @property
    def new_hw(self) -> tuple[int, int]:
        return (int(round(self.height * self.scale)), int(round(self.width * self.scale)))

    def coords_to_model(self, coords_xy: np.ndarray) -> np.ndarray:
        """(N, 2) slice-pixel xy -> model-input pixel xy. Pixel centres: SAM adds 0.5 itself."""
        return np.asarray(coords_xy, dtype=np.float32) * np.float32(self.scale)

    def box_to_model(self, box_xyxy: Sequence[float]) -> np.ndarray:
        """Inclusive pixel box (x0, y0, x1, y1) in the slice -> model-input xyxy."""
        return np.asarray(box_xyxy, dtype=np.float32) * np.float32(self.scale)

    def lowres_valid_hw(self, lowres_size: int = 256) -> tuple[int, int]:
        """The part of a (lowres_size)^2 logit map that covers the slice (the rest is padding)."""
        factor = lowres_size / self.image_size
        new_h, new_w = self.new_hw
        return max(1, int(round(new_h * factor))), max(1, int(round(new_w * factor)))


def slices_to_model_input(slices_u8: np.ndarray, image_size: int, normalization: str = "minmax01"):
    """Prepare a batch of uint8 slices for the image encoder.

    Args:
        slices_u8: (B, H, W) uint8, already windowed.
        image_size: model input side (256 for LiteMedSAM, 1024 for SAM ViTs).
        normalization: "minmax01" (per slice to [0, 1]) or "sam_imagenet" (SAM's mean/std).
    Returns:
        (torch tensor (B, 3, S, S) float32, SliceGeometry).
    """
    import torch
    import torch.nn.functional as F

    slices = torch.as_tensor(np.ascontiguousarray(slices_u8)).float()  # B,H,W
    b, h, w = slices.shape
    geom = SliceGeometry(h, w, image_size)
    new_h, new_w = geom.new_hw
    if (new_h, new_w) != (h, w):
        slices = F.interpolate(slices[:, None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                               antialias=True)[:, 0]
    if normalization == "minmax01":
        flat = slices.reshape(b, -1)
        lo = flat.min(dim=1).values.view(b, 1, 1)
        hi = flat.max(dim=1).values.view(b, 1, 1)
        slices = (slices - lo) / torch.clamp(hi - lo, min=1e-8)
        x = slices[:, None].expand(b, 3, new_h, new_w)
    elif normalization == "sam_imagenet":
        mean = torch.as_tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)
        std = torch.as_tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)
        x = (slices[:, None].expand(b, 3, new_h, new_w) - mean) / std
    else:
        raise ValueError(f"Unknown normalization {normalization!r}; expected 'minmax01' or 'sam_imagenet'.")
    x = F.pad(x, (0, image_size - new_w, 0, image_size - new_h))  # bottom/right zero padding
    return x.contiguous(), geom


def logits_to_mask(logits_256, geom: SliceGeometry):
    """Low-res logits (..., 256, 256) -> full-resolution logits (..., H, W), padding cropped off.

    Returns a float32 torch tensor; threshold at 0 for the mask.
    """
    import torch.nn.functional as F

    lead = logits_256.shape[:-2]
    valid_h, valid_w = geom.lowres_valid_hw(logits_256.shape[-1])
    cropped = logits_256[..., :valid_h, :valid_w].reshape(-1, 1, valid_h, valid_w).float()
    full = F.interpolate(cropped, size=(geom.height, geom.width), mode="bilinear", align_corners=False)
    return full.reshape(*lead, geom.height, geom.width)


# A CT opens in the lung window when at least this share of the body (its outline, holes filled) is
# aerated lung (-950 to -400 HU; bowel gas and the air outside are near -1000). Measured with
# `choose_window` on the shared data: the abdomen CTs hold 0.1-3 % (the TotalSegmentator abdomen,
# whose top slices catch the lung bases, 3 %; the MSD spleen 0.1 %), the 41 limb CTs of the sarcoma
# set 0-0.6 %, the TotalSegmentator lung bases alone (its 5 top slices) 9.6 %; a chest CT's lungs
# fill roughly a third of its body.
LUNG_WINDOW_SHARE = 0.08
LUNG_HU = (-950.0, -400.0)


def aerated_lung_share(view_zyx: np.ndarray, max_slices: int = 48, max_side: int = 256) -> float:
    """The share of the body's voxels (its outline per slice, holes filled) in the lung range `LUNG_HU`.

    view_zyx: (Z, H, W) CT in Hounsfield units. Sub-sampled to at most `max_slices` slices of at
    most `max_side` pixels a side, so a full CT takes a fraction of a second.
    """
    from scipy import ndimage

    data = np.asarray(view_zyx)
    step_z = max(1, int(np.ceil(data.shape[0] / max_slices)))
    step_yx = max(1, int(np.ceil(max(data.shape[1:]) / max_side)))
    body_voxels = lung_voxels = 0
    for slice_yx in data[::step_z, ::step_yx, ::step_yx]:
        slice_yx = slice_yx.astype(np.float32, copy=False)
        tissue = slice_yx > LUNG_HU[1]
        body = ndimage.binary_fill_holes(tissue)  # the lungs are holes in the body's tissue
        body_voxels += int(body.sum())
        lung_voxels += int((body & ~tissue & (slice_yx > LUNG_HU[0])).sum())
    return lung_voxels / body_voxels if body_voxels else 0.0


def choose_window(view_zyx: np.ndarray, modality: str = "CT") -> tuple[str, str]:
    """The window a scan opens in: ("lung" | "abdomen" | "mr", why), from the scan itself.

    MR (and an unknown modality) gets the MR percentiles; a CT whose body is at least
    `LUNG_WINDOW_SHARE` aerated lung gets the lung window, any other CT the abdomen window.
    """
    if str(modality).upper() != "CT":
        return "mr", "an MR scan is scaled by its own 0.5-99.5 percentiles"
    share = aerated_lung_share(view_zyx)
    if share >= LUNG_WINDOW_SHARE:
        return "lung", f"{share:.0%} of the body is aerated lung"
    return "abdomen", f"only {share:.0%} of the body is aerated lung"
