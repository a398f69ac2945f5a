"""Prompt layers: napari Points/Shapes layers (z, row, col) <-> the engine's prompts on one slice.

`MedSAM + points` (inside the structure), `MedSAM - points` (to exclude) and `MedSAM boxes`
(rectangles) hold the current object's prompts; `PromptLayers` makes them, swaps their content when
another object becomes current (the session keeps each object's prompts, `store_prompts`), and
reads the prompts drawn on a slice in the engine's frame (`prompts_on_slice`).
"""

from __future__ import annotations

import numpy as np

LAYER_FG = "MedSAM + points"
LAYER_BG = "MedSAM - points"
LAYER_BOX = "MedSAM boxes"
BOX_STYLE = dict(edge_color="yellow", face_color="transparent", edge_width=1.5)
POINT_STYLE = dict(face_color="transparent", size=5, border_width=0.22, border_width_is_relative=True)


def prompts_on_slice(fg_data, bg_data, box_data, z: int, shape_hw):
    """The prompts drawn on slice z, in the engine's frame.

    Args:
        fg_data, bg_data: (N, 3) Points layer data (z, row, col): inside / outside points.
        box_data: Shapes layer data, a list of (4, 3) rectangles (z, row, col).
        z: the slice (view frame). shape_hw: (rows, cols) of a slice.
    Returns:
        (points_yx (N, 2) or None, point_labels (N,) 1/0 or None, box_xyxy float32 or None, note):
        the latest box on the slice wins, clipped to the image; `note` is "tiny" when the box as
        drawn is under 2 pixels wide or high (a click with the box tool, without a drag),
        "outside" when only the clipped box is (it lay off the image), "clipped" when it was cut,
        else None. Points off the image are dropped.
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
            if raw[2] - raw[0] < 2 or raw[3] - raw[1] < 2:
                note = "tiny"  # a click with the box tool, no drag: nothing to segment in
            elif x1 - x0 < 2 or y1 - y0 < 2:
                note = "outside"
            else:
                note = "clipped" if not np.allclose(raw, box) else None
    if len(points_yx):
        inside = (points_yx[:, 0] >= 0) & (points_yx[:, 0] <= h - 1) & (points_yx[:, 1] >= 0) & (points_yx[:, 1] <= w - 1)
        points_yx, labels = points_yx[inside], labels[inside]
    return (points_yx if len(points_yx) else None), (labels if len(labels) else None), box, note


class PromptLayers:
    """The three prompt layers over a scan, with view-frame geometry `geometry` (napari scale/translate...)."""

    NAMES = (LAYER_BOX, LAYER_BG, LAYER_FG)

    def __init__(self, viewer, geometry: dict, shape_zyx):
        self.viewer = viewer
        self.shape_hw = tuple(int(v) for v in shape_zyx[1:])
        self.box = viewer.add_shapes(ndim=3, name=LAYER_BOX, **BOX_STYLE, **geometry)
        # Rings, not discs: a click inside a small lesion must not hide the lesion it marks.
        self.bg = viewer.add_points(ndim=3, name=LAYER_BG, **POINT_STYLE, border_color="red", **geometry)
        self.fg = viewer.add_points(ndim=3, name=LAYER_FG, **POINT_STYLE, border_color="lime", **geometry)
        for layer in self.layers:
            layer.projection_mode = "none"  # a prompt shows on its own slice only

    @property
    def layers(self):
        return (self.box, self.bg, self.fg)

    def data(self) -> dict:
        """What the layers hold: {"fg": (N, 3), "bg": (N, 3), "boxes": [(4, 3)]} (`session.store_prompts`)."""
        return {"fg": np.asarray(self.fg.data, dtype=np.float64).copy(),
                "bg": np.asarray(self.bg.data, dtype=np.float64).copy(),
                "boxes": [np.asarray(b, dtype=np.float64).copy() for b in self.box.data]}

    def load(self, prompts: dict) -> None:
        """Show `prompts` (as `data()` gives them) instead of what the layers hold."""
        self.fg.data = np.asarray(prompts.get("fg", np.zeros((0, 3)))).reshape(-1, 3)
        self.bg.data = np.asarray(prompts.get("bg", np.zeros((0, 3)))).reshape(-1, 3)
        self._set_boxes([np.asarray(b) for b in prompts.get("boxes", [])])

    def _set_boxes(self, boxes) -> None:
        self.box.data = []
        if boxes:
            self.box.add_rectangles(boxes, **BOX_STYLE)

    def on_slice(self, z: int):
        """`prompts_on_slice` of the layers on slice z: (points_yx, point_labels, box_xyxy, note)."""
        return prompts_on_slice(self.fg.data, self.bg.data, self.box.data, z, self.shape_hw)

    def add_box(self, box_xyxy, z: int) -> None:
        """A box (x0, y0, x1, y1 slice pixels) on slice z, as the rectangle tool draws it."""
        x0, y0, x1, y1 = [float(v) for v in box_xyxy]
        rect = np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]], dtype=np.float64)
        self.box.add_rectangles([rect], **BOX_STYLE)

    def add_point(self, yx, positive: bool, z: int) -> None:
        (self.fg if positive else self.bg).add(np.array([[z, float(yx[0]), float(yx[1])]]))

    def clear_slice(self, z: int) -> None:
        """Remove every prompt on slice z."""
        for layer in (self.fg, self.bg):
            data = np.asarray(layer.data).reshape(-1, 3)
            layer.data = data[np.round(data[:, 0]).astype(int) != z]
        self._set_boxes([s for s in self.box.data if not np.all(np.round(np.asarray(s)[:, 0]).astype(int) == z)])

    def drop_tiny_boxes(self, z: int) -> None:
        """Remove the boxes on slice z under 2 pixels wide or high (clicks with the box tool)."""
        def tiny(shape):
            a = np.asarray(shape, dtype=np.float64)
            return np.all(np.round(a[:, 0]).astype(int) == z) and min(np.ptp(a[:, 1]), np.ptp(a[:, 2])) < 2

        if any(tiny(b) for b in self.box.data):
            self._set_boxes([b for b in self.box.data if not tiny(b)])
            self.box.mode = "add_rectangle"

    def activate_box_tool(self) -> None:
        self.viewer.layers.selection.active = self.box
        self.box.mode = "add_rectangle"

    def activate_point_tool(self, positive: bool = True) -> None:
        layer = self.fg if positive else self.bg
        self.viewer.layers.selection.active = layer
        layer.mode = "add"
