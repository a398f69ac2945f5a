"""One colour per label id, shared by the napari layer, the sidecar files and the PNG overlays."""

from __future__ import annotations

import colorsys

# Distinct, readable colours for the first labels (organ-atlas-like order); later ids are
# spread around the hue circle by the golden ratio so neighbours never look alike.
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]


def label_color(label_id: int) -> tuple[int, int, int]:
    """RGB 0-255 for a label id >= 1."""
    if label_id <= 0:
        return (0, 0, 0)
    if label_id <= len(_PALETTE):
        return _PALETTE[label_id - 1]
    hue = (label_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return (int(r * 255), int(g * 255), int(b * 255))
