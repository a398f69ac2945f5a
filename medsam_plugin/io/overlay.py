"""PNG pictures of a segmentation: a row of slices through the objects, labels blended in colour."""

from __future__ import annotations

import numpy as np

from .atomic import atomic_write
from .colors import default_label_color


def overlay_slice(image_u8_yx: np.ndarray, labels_yx: np.ndarray, colors: dict[int, tuple], alpha: float = 0.45
                  ) -> np.ndarray:
    """(H, W) uint8 image + (H, W) labels -> (H, W, 3) uint8 with filled, outlined labels."""
    from scipy.ndimage import binary_erosion

    rgb = np.repeat(image_u8_yx[..., None], 3, axis=2).astype(np.float32)
    for label_id in np.unique(labels_yx):
        if label_id == 0:
            continue
        mask = labels_yx == label_id
        color = np.array(colors.get(int(label_id), default_label_color(int(label_id))), dtype=np.float32)
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * color
        rgb[mask & ~binary_erosion(mask)] = color
    return np.clip(rgb, 0, 255).astype(np.uint8)


def save_overlay_png(path, image_u8_zyx: np.ndarray, labels_zyx: np.ndarray, objects: dict | None = None,
                     n_slices: int = 5, spacing_zyx=(1.0, 1.0, 1.0), height: int = 256):
    """Write a strip of `n_slices` slices evenly spread over the labelled range, in view orientation.

    Rows are stretched by the in-plane spacing ratio so anatomy keeps its true proportions.
    """
    from PIL import Image

    colors = {k: getattr(o, "color", default_label_color(k)) for k, o in (objects or {}).items()}
    present = np.flatnonzero(labels_zyx.any(axis=(1, 2)))
    if present.size == 0:
        zs = np.linspace(0, image_u8_zyx.shape[0] - 1, n_slices).round().astype(int)
    else:
        zs = np.unique(np.linspace(present[0], present[-1], min(n_slices, present.size)).round().astype(int))
    tiles = []
    for z in zs:
        tile = Image.fromarray(overlay_slice(image_u8_zyx[z], labels_zyx[z], colors))
        h, w = image_u8_zyx.shape[1:]
        aspect = (w * spacing_zyx[2]) / (h * spacing_zyx[1])
        tiles.append(tile.resize((max(1, int(round(height * aspect))), height), Image.BILINEAR))
    gap = 4
    strip = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height), (0, 0, 0))
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + gap
    return atomic_write(path, lambda tmp: strip.save(tmp, format="PNG"), suffix=".png")
