"""Prompt-layer conversion: napari Points/Shapes data (z, row, col) -> the engine's prompts on one slice."""

from __future__ import annotations

import numpy as np


def prompts_on_slice(fg_data, bg_data, box_data, z: int, shape_hw):
    """The prompts drawn on slice z, in the engine's frame.

    Args:
        fg_data, bg_data: (N, 3) Points layer data (z, row, col): inside / outside points.
        box_data: Shapes layer data, a list of (4, 3) rectangles (z, row, col).
        z: the slice (view frame). shape_hw: (rows, cols) of a slice.
    Returns:
        (points_yx (N, 2) or None, point_labels (N,) 1/0 or None, box_xyxy float32 or None, note):
        the latest box on the slice wins, clipped to the image; `note` is "outside" when the
        clipped box is under 2 pixels wide or high (it lay off the image), "clipped" when it was
        cut, else None. Points off the image are dropped.
    """
    h, w = (int(v) for v in shape_hw)
    pts, labs = [], []
    for data, lab in ((fg_data, 1), (bg_data, 0)):
        data = np.asarray(data, dtype=np.float64).reshape(-1, 3)
        on = data[np.round(data[:, 0]).astype(int) == z]
        pts.append(on[:, 1:])
        labs.append(np.full(len(on), lab, dtype=np.int64))
    points_yx = np.concatenate(pts)
    labels = np.concatenate(labs)
    box, note = None, None
    for shape in box_data:
        s = np.asarray(shape, dtype=np.float64)
        if s.shape[1] == 3 and np.all(np.round(s[:, 0]).astype(int) == z):
            raw = (s[:, 2].min(), s[:, 1].min(), s[:, 2].max(), s[:, 1].max())
            y0, y1 = np.clip([raw[1], raw[3]], 0, h - 1)
            x0, x1 = np.clip([raw[0], raw[2]], 0, w - 1)
            box = np.array([x0, y0, x1, y1], dtype=np.float32)
            note = "outside" if (x1 - x0 < 2 or y1 - y0 < 2) else ("clipped" if not np.allclose(raw, box) else None)
    if len(points_yx):
        inside = (points_yx[:, 0] >= 0) & (points_yx[:, 0] <= h - 1) & (points_yx[:, 1] >= 0) & (points_yx[:, 1] <= w - 1)
        points_yx, labels = points_yx[inside], labels[inside]
    return (points_yx if len(points_yx) else None), (labels if len(labels) else None), box, note
