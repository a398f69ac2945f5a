"""One colour per label id, shared by the napari layer, the sidecar files and the PNG overlays."""

from __future__ import annotations

import colorsys
from typing import Iterable

# Twenty well-separated colours (RGB 0-255) for label ids 1..20; later ids continue on the
# golden-angle hue wheel so neighbouring ids never look alike.
_BASE_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (255, 225, 25),  # yellow
    (0, 130, 200),  # blue
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (210, 245, 60),  # lime
    (250, 190, 212),  # pink
    (0, 128, 128),  # teal
    (220, 190, 255),  # lavender
    (170, 110, 40),  # brown
    (255, 250, 200),  # beige
    (128, 0, 0),  # maroon
    (170, 255, 195),  # mint
    (128, 128, 0),  # olive
    (255, 215, 180),  # apricot
    (0, 0, 128),  # navy
    (128, 128, 128),  # grey
)


def default_label_color(label_id: int) -> tuple[int, int, int]:
    """A distinct RGB colour (0-255) for a label id; 0 (background) is black."""
    label_id = int(label_id)
    if label_id <= 0:
        return (0, 0, 0)
    if label_id <= len(_BASE_PALETTE):
        return _BASE_PALETTE[label_id - 1]
    hue = (label_id * 0.618033988749895) % 1.0
    sat = 0.55 + 0.35 * ((label_id * 7) % 3) / 2
    r, g, b = colorsys.hsv_to_rgb(hue, sat, 0.95)
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


def default_palette(label_ids: Iterable[int]) -> dict[int, tuple[int, int, int]]:
    """{id: (r, g, b)} with `default_label_color` for each id."""
    return {int(i): default_label_color(int(i)) for i in label_ids}
