"""Label layers: the napari layers that show the session's result, and read the user's brush strokes back.

- `MedSAM labels` shows exactly the session's label map (`LabelVolume.array`): what is accepted
  and what the label map export writes. It is the layer the user paints in.
- `MedSAM pending` shows what is not accepted yet (the slice result after S, the slices of a
  running propagation), as micro-sam's `current_object`: a preview is never merged into the
  result, and a cancel only clears this layer.
- Under "allow overlap", each object whose extent goes beyond what the label map gives it (others
  hold part of it) gets a layer of its own, `MedSAM overlap: <name>`, with its whole extent, as
  3D Slicer shows overlapping segments; export writes each such layer's content as that object's
  own file, and File > Save on the layer writes the same file.
- `MedSAM orientation`: the patient directions (L/R/A/P or S/I) at the edges of every slice.

No workflow decision is taken here: what to show comes from the session.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from .._reader import META_AXIS, META_COLORS, META_MODEL, META_NAMES, META_TRUE_AFFINE, META_VOLUME

LAYER_LABELS = "MedSAM labels"
LAYER_PENDING = "MedSAM pending"  # what is shown but not accepted (micro-sam's current_object)
LAYER_OVERLAP_PREFIX = "MedSAM overlap: "  # + the object's name: one layer per overlapping object ("allow")
LAYER_ORIENTATION = "MedSAM orientation"  # L/R/A/P (or S/I) markers at the slice's edges

# letters at the (top, bottom, left, right) edges of a slice, per view axis (radiological display)
EDGE_LETTERS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}


def overlap_layer_name(name: str) -> str:
    return f"{LAYER_OVERLAP_PREFIX}{name}"


class LabelLayers:
    """The result layers over one session's scan.

    Args:
        viewer: the napari viewer. session: the `SegmentationSession` shown.
        geometry: napari scale/translate/affine of the scan's view (`_reader.layer_geometry`).
        on_new_layer: called with each layer made later (an object's overlap layer), so the
            controller binds its keys there too.
    """

    def __init__(self, viewer, session, geometry: dict, on_new_layer=None):
        self.viewer = viewer
        self.session = session
        self.geometry = dict(geometry)
        self.on_new_layer = on_new_layer
        self.updating = False  # True while this class writes into the layers (not the user's painting)
        self.hidden: set[int] = set()  # objects not shown (their colour is transparent); export is unchanged
        self.overlaps: dict[int, object] = {}  # label id -> its own Labels layer ("allow overlap")
        self.colors: dict = {None: np.array([1.0, 1.0, 1.0, 1.0]), 0: np.zeros(4)}
        s = session
        with self.writing():
            self.labels = viewer.add_labels(s.labels.array.copy(), name=LAYER_LABELS, metadata=self._metadata(),
                                            opacity=0.55, **self.geometry)
            self.pending = viewer.add_labels(np.zeros_like(s.labels.array), name=LAYER_PENDING, opacity=0.75,
                                             **self.geometry)
            self.pending.editable = False  # previews are made by the model, never painted
            self.orientation = self._add_orientation_markers()

    @property
    def layers(self) -> list:
        return [self.labels, self.pending, *self.overlaps.values()]

    @contextmanager
    def writing(self):
        """Mark writes into the layers as the program's (a paint listener must not take them for painting)."""
        before, self.updating = self.updating, True
        try:
            yield
        finally:
            self.updating = before

    def _metadata(self, label_ids=None) -> dict:
        """What the writer needs to put a layer's voxels back on the source scan's grid."""
        s = self.session
        objs = {k: o for k, o in s.labels.objects.items() if label_ids is None or k in label_ids}
        return {META_VOLUME: s.volume, META_AXIS: s.view.axis,
                META_NAMES: {k: o.name for k, o in objs.items()}, META_COLORS: {k: tuple(o.color) for k, o in objs.items()},
                META_TRUE_AFFINE: np.asarray(s.view.display_affine, dtype=np.float64)}

    def _add_orientation_markers(self):
        """A 2D Points layer of text only: the patient directions at the four edges of every slice."""
        _, h, w = self.session.shape_zyx
        top, bottom, left, right = EDGE_LETTERS.get(self.session.view.axis, EDGE_LETTERS["axial"])
        pad = 0.04 * max(h, w)  # just inside the slice's edges, where the canvas never clips them
        yx = np.array([[pad, (w - 1) / 2], [h - 1 - pad, (w - 1) / 2], [(h - 1) / 2, pad], [(h - 1) / 2, w - 1 - pad]])
        layer = self.viewer.add_points(
            yx, name=LAYER_ORIENTATION, size=0.01, face_color="transparent", border_width=0,
            features={"letter": [top, bottom, left, right]},
            text={"string": "{letter}", "color": "yellow", "size": 14, "anchor": "center"},
            scale=self.geometry["scale"][1:], translate=self.geometry["translate"][1:])
        layer.editable = False
        # Under the result layers: a mask at the slice's edge covers a letter, never the other way round.
        layers = self.viewer.layers
        layers.move(layers.index(layer), layers.index(self.labels))
        # In 3D the letters would float over the rendered object: they are for slices only.
        layer.visible = self.viewer.dims.ndisplay == 2
        self.viewer.dims.events.ndisplay.connect(self._on_ndisplay)
        return layer

    def _on_ndisplay(self, event=None) -> None:
        if self.orientation in self.viewer.layers:
            self.orientation.visible = self.viewer.dims.ndisplay == 2

    def close(self) -> None:
        """Stop following the viewer (the scan is closed or its layers are made anew)."""
        try:
            self.viewer.dims.events.ndisplay.disconnect(self._on_ndisplay)
        except Exception:  # already disconnected
            pass

    # ------------------------------------------------------------------ showing the session
    def show(self) -> None:
        """Show the session's labels in the Labels layer, only its held slice result in the pending layer,
        and one layer per overlapping object."""
        s = self.session
        with self.writing():
            self.labels.data[...] = s.labels.array
            self.labels.refresh()
            pend = self.pending.data
            if pend.any():
                pend[...] = 0
            if s.pending is not None:
                label_id, pred = s.pending
                pend[pred.z] = self.preview_slice(label_id, pred.mask_yx)
            self.pending.refresh()
            self._show_overlaps()

    def show_slice(self, z: int) -> None:
        """Slice z of the Labels layer as the session holds it, and nothing pending there (after an accept)."""
        with self.writing():
            self.labels.data[z] = self.session.labels.array[z]
            self.labels.refresh()
            self.pending.data[z] = 0
            self.pending.refresh()

    def preview_slice(self, label_id: int, mask_yx: np.ndarray) -> np.ndarray:
        """A pending-layer slice: `label_id` where `mask_yx` is set (what accepting it would try to claim)."""
        return np.where(mask_yx, label_id, 0).astype(self.pending.data.dtype)

    def show_pending_slice(self, z: int, label_id: int, mask_yx: np.ndarray, only: bool = False) -> None:
        """Draw a slice result on slice z of the pending layer (with `only`, clear the rest first)."""
        with self.writing():
            pend = self.pending.data
            if only and pend.any():
                pend[...] = 0
            pend[z] = self.preview_slice(label_id, mask_yx)
            self.pending.refresh()

    def pending_shows(self) -> bool:
        """Whether anything not accepted is on screen."""
        return bool(np.asarray(self.pending.data).any())

    def _show_overlaps(self) -> None:
        """"allow overlap": a layer per object that overlaps others, with its whole extent; none otherwise."""
        s = self.session
        wanted = s.overlapping_objects()
        for label_id in [k for k in self.overlaps if k not in wanted]:
            layer = self.overlaps.pop(label_id)
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        for label_id in wanted:
            mask = s.object_mask(label_id)
            data = np.where(mask, label_id, 0).astype(s.labels.array.dtype)
            name = overlap_layer_name(s.labels.objects[label_id].name)
            layer = self.overlaps.get(label_id)
            if layer is None:
                layer = self._add_overlap_layer(label_id, data, name)
            else:
                layer.data[...] = data
                layer.metadata.update(self._metadata({label_id}))
                if layer.name != name:
                    layer.name = name
                layer.refresh()
            layer.visible = label_id not in self.hidden

    def _add_overlap_layer(self, label_id: int, data: np.ndarray, name: str):
        from napari.utils.colormaps import DirectLabelColormap

        active = self.viewer.layers.selection.active  # adding a layer selects it: keep the user's tool
        layer = self.viewer.add_labels(data, name=name, metadata=self._metadata({label_id}), opacity=0.45,
                                       colormap=DirectLabelColormap(color_dict=self.colors), **self.geometry)
        layer.editable = False  # the user paints in the Labels layer; this one follows the session
        layers = self.viewer.layers
        layers.move(layers.index(layer), layers.index(self.pending) + 1)  # under the prompt layers
        if active is not None and active in layers:
            layers.selection.active = active
        self.overlaps[label_id] = layer
        if self.on_new_layer is not None:
            self.on_new_layer(layer)
        return layer

    def set_colors(self, current: int | None = None, model_name: str | None = None) -> None:
        """The objects' colours (hidden ones transparent) in every result layer, and the writer's metadata."""
        from napari.utils.colormaps import DirectLabelColormap

        objs = self.session.labels.objects
        colors = {None: np.array([1.0, 1.0, 1.0, 1.0]), 0: np.zeros(4)}
        for label_id, obj in objs.items():
            alpha = 0.0 if label_id in self.hidden else 1.0
            colors[label_id] = np.array([*(c / 255.0 for c in obj.color[:3]), alpha])
        self.colors = colors
        for layer in self.layers:
            layer.colormap = DirectLabelColormap(color_dict=colors)
        self.labels.metadata.update(self._metadata())
        if model_name is not None:
            self.labels.metadata[META_MODEL] = model_name  # a DICOM SEG names the algorithm's model
        if current is not None:
            self.labels.selected_label = current
        for label_id, layer in self.overlaps.items():
            layer.visible = label_id not in self.hidden
            if model_name is not None:
                layer.metadata[META_MODEL] = model_name

    # ------------------------------------------------------------------ the user's painting
    def painted(self) -> np.ndarray:
        """What the Labels layer holds now (the session's labels plus any brush strokes not taken yet)."""
        return np.asarray(self.labels.data)

    def set_editable(self, editable: bool) -> None:
        self.labels.editable = editable
