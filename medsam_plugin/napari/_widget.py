"""The MedSAM dock widget: a thin Qt adapter over `engine.session.SegmentationSession`.

Workflow (docs/NAPARI.md): open a scan, draw a box (or click points) on one slice, press S to
segment it, P to propagate through the volume, correct a slice with clicks (S again), paint with
napari's label tools if needed, then export. Every handler is a plain method (tests call them);
the keyboard shortcuts in `SHORTCUTS` call the same methods. After a propagation the review strip
shows the object's per-slice confidence along z, and G jumps to the least confident propagated
slice not yet reviewed.

Threading: model loading, slice encoding, propagation and precomputation run in napari
`thread_worker`s via `_tasks.start_task` (inline with MEDSAM_PLUGIN_INLINE=1). While a task runs
the Labels layer is read-only, so the user's painting can never race a propagation.

Labels: the session's `LabelVolume` is the truth, and the `MedSAM labels` layer shows exactly it.
What is not accepted yet (a slice preview after S, the slices of a running propagation) is drawn
in a layer of its own, `MedSAM pending` (as micro-sam's `current_object`), so a preview is never
merged into the result and diffed back out, and a cancel only has to clear that layer. Painting
in the Labels layer is pushed into the session (`SegmentationSession.paint`, undoable) before any
engine call; the session keeps those brush edits through later propagations of the object.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QColorDialog,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from . import _autosave
from ._reader import (META_AXIS, META_COLORS, META_MODEL, META_NAMES, META_SOURCE, META_TRUE_AFFINE, META_VOLUME,
                      layer_geometry)
from ..model.defaults import DEFAULT_MODEL
from ._prompt_layers import prompts_on_slice
# the review strip is its own module; its names stay importable from here
from ._strip import (STRIP_EMPTY, STRIP_HEIGHT, STRIP_SEED, STRIP_WIDTH, ConfidenceStrip,  # noqa: F401
                     confidence_color, render_confidence_strip)
from ._tasks import Task, start_task

log = logging.getLogger(__name__)

# the default first; medsam_interactive answers clicks and dense prompts, lite_medsam boxes only
MODELS = tuple(dict.fromkeys((DEFAULT_MODEL, "medsam_interactive", "lite_medsam", "medsam_vit_b", "sam_vit_b")))
DEVICES = ("auto", "cpu", "cuda", "mps")
WINDOWS = {  # name -> (level, width) in HU; "mr" = percentile normalisation
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}
WINDOW_CHOICES = ("abdomen", "lung", "brain", "bone", "custom", "mr")

# key -> (method name, arguments, description); bound on the viewer and on the plugin's layers.
SHORTCUTS = {
    "S": ("segment_slice", (), "segment this slice from its prompts"),
    "A": ("accept", (), "accept the slice result"),
    "P": ("propagate", ("both",), "propagate up and down"),
    "U": ("propagate", ("up",), "propagate up (towards higher slice numbers)"),
    "D": ("propagate", ("down",), "propagate down (towards lower slice numbers)"),
    "X": ("stop_here", (), "stop the object at this slice"),
    "C": ("clear_object", (), "clear the current object"),
    "N": ("add_object", (), "new object"),
    "G": ("review_next", (), "go to the least confident propagated slice not yet reviewed"),
    "Control-Z": ("undo", (), "undo"),
    "Control-Shift-Z": ("redo", (), "redo"),
}

LAYER_FG = "MedSAM + points"
LAYER_BG = "MedSAM - points"
LAYER_BOX = "MedSAM boxes"
LAYER_LABELS = "MedSAM labels"
LAYER_PENDING = "MedSAM pending"  # what is shown but not accepted (micro-sam's current_object)
LAYER_OVERLAPS = "MedSAM overlaps"  # "allow overlap": each object's voxels that another object holds
LAYER_ORIENTATION = "MedSAM orientation"  # L/R/A/P (or S/I) markers at the slice's edges

# overlap rule shown -> SegmentationSession.overlap (3D Slicer's Segment Editor choices)
OVERLAP_CHOICES = {"overwrite none": "none", "overwrite all": "all", "allow overlap": "allow"}
# letters at the (top, bottom, left, right) edges of a slice, per view axis (radiological display)
EDGE_LETTERS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}
VOLUME_SUFFIX = "  —  "  # between an object's name and its volume in the list


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications

    {"info": notifications.show_info, "warning": notifications.show_warning,
     "error": notifications.show_error}[kind](message)


def _swatch(rgb) -> QIcon:
    pix = QPixmap(14, 14)
    pix.fill(QColor(*[int(c) for c in rgb[:3]]))
    return QIcon(pix)


class MedSAMWidget(QWidget):
    """Interactive MedSAM segmentation of the selected scan.

    Args:
        napari_viewer: the viewer (napari passes it).
        autosave_policy: what to do when an autosave of the opened scan exists: "ask" (notify
            and enable the "Restore autosave" button), "restore" or "ignore". Default:
            $MEDSAM_PLUGIN_AUTOSAVE or "ask".
        inline: run long work in the GUI thread (tests, debugging); default $MEDSAM_PLUGIN_INLINE.
        embedding_cache: folder for on-disk slice embeddings (keyed by slice content + model), so
            reopening a scan does not re-encode it; default `<cache root>/embeddings`
            (see `_autosave.cache_root`); False keeps them in memory only.
    """

    def __init__(self, napari_viewer, autosave_policy: str | None = None, inline: bool | None = None,
                 embedding_cache=None):
        super().__init__()
        self.viewer = napari_viewer
        if embedding_cache is None:
            embedding_cache = _autosave.cache_root() / "embeddings"
        self.embedding_cache = Path(embedding_cache) if embedding_cache else None
        self.autosave_policy = autosave_policy or os.environ.get("MEDSAM_PLUGIN_AUTOSAVE", "ask")
        self.inline = inline
        self.session = None
        self.image_layer = None
        self.labels_layer = None
        self.fg_layer = None
        self.bg_layer = None
        self.box_layer = None
        self.pending_layer = None
        self.overlap_layer = None
        self.orientation_layer = None
        self.current_label: int | None = None
        self.prompts: dict[int, dict] = {}  # label id -> {"fg": (N,3), "bg": (N,3), "boxes": [(4,3)]}
        self.pending = None  # (label id, SlicePrediction) shown but not accepted
        self.task: Task | None = None
        self.autosave_folder: Path | None = None
        self.offered_folder: Path | None = None  # a copy of the autosave offered for restoring
        self.autosave_enabled = True
        self.timings: dict[str, list[float]] = {"segment_s": [], "propagation_step_s": []}
        self._propagated: set[int] = set()
        self.reviewed: dict[int, set[int]] = {}  # label id -> slices the review key has shown
        self._loaded_models: dict[tuple[str, str], object] = {}
        self._updating = False
        self._bound_keys: list[tuple[object, str]] = []
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh_scan_choices)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.dims.events.current_step.connect(self._on_slice_changed)
        self._strip_data: tuple = ({}, (), 0)  # (confidence, seeds, n slices) of the current object
        self._refresh_scan_choices()
        self._bind_keys(self.viewer)
        if self.session is None:
            candidates = [l for l in self._image_layers() if META_VOLUME in l.metadata]
            if candidates:
                self.start_session(candidates[-1])

    # ================================================================== UI
    def _build_ui(self) -> None:
        root = QVBoxLayout(self)

        scan = QGroupBox("Scan and model")
        form = QFormLayout(scan)
        self.scan_combo = QComboBox()
        self.start_btn = QPushButton("Use this scan")
        self.start_btn.clicked.connect(lambda: self.start_session())
        row = QHBoxLayout()
        row.addWidget(self.scan_combo, 1)
        row.addWidget(self.start_btn)
        form.addRow("Image", row)
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.addItems(MODELS)
        self.model_combo.setToolTip("A registered model name, or the path of a fine-tuned checkpoint.")
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.setToolTip("Choose a checkpoint file")
        browse.clicked.connect(self._browse_checkpoint)
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(browse)
        form.addRow("Model", row)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.model_combo.activated.connect(lambda *_: self.change_model())
        self.model_combo.lineEdit().editingFinished.connect(self.change_model)
        self.device_combo.currentTextChanged.connect(lambda *_: self.change_model())
        form.addRow("Device", self.device_combo)
        self.window_combo = QComboBox()
        self.window_combo.addItems(WINDOW_CHOICES)
        self.level_spin = QDoubleSpinBox()
        self.width_spin = QDoubleSpinBox()
        for spin, value in ((self.level_spin, 40.0), (self.width_spin, 400.0)):
            spin.setRange(-4000.0, 6000.0)
            spin.setValue(value)
            spin.setEnabled(False)
        self.width_spin.setMinimum(1.0)
        self.window_combo.currentTextChanged.connect(self._on_window_choice)
        self.level_spin.editingFinished.connect(lambda: self.set_window("custom"))
        self.width_spin.editingFinished.connect(lambda: self.set_window("custom"))
        row = QHBoxLayout()
        row.addWidget(self.window_combo, 1)
        row.addWidget(QLabel("L"))
        row.addWidget(self.level_spin)
        row.addWidget(QLabel("W"))
        row.addWidget(self.width_spin)
        form.addRow("Intensity", row)
        root.addWidget(scan)

        objects = QGroupBox("Objects")
        lay = QVBoxLayout(objects)
        self.object_list = QListWidget()
        self.object_list.setMaximumHeight(120)
        self.object_list.currentItemChanged.connect(self._on_object_item)
        self.object_list.itemChanged.connect(self._on_object_renamed)
        self.object_list.setToolTip("Tick: shown. Double-click: rename. The volume is each object's own voxels.")
        lay.addWidget(self.object_list)
        row = QHBoxLayout()
        for text, slot in (("Add [N]", lambda: self.add_object()), ("Rename", self._rename_clicked),
                           ("Colour…", self._color_clicked), ("Lock", lambda: self.toggle_lock()),
                           ("Delete", lambda: self.delete_object())):
            b = QPushButton(text)
            b.clicked.connect(slot)
            row.addWidget(b)
        lay.addLayout(row)
        row = QHBoxLayout()
        self.overlap_combo = QComboBox()
        self.overlap_combo.addItems(OVERLAP_CHOICES)
        self.overlap_combo.setToolTip("What a new result may overwrite: nothing another object holds (overwrite "
                                      "none), everything but locked objects (overwrite all), or nothing, while each "
                                      "object keeps its full extent in its own layer and file (allow overlap).")
        self.overlap_combo.currentTextChanged.connect(lambda text: self.set_overlap(OVERLAP_CHOICES[text]))
        row.addWidget(QLabel("Overlap"))
        row.addWidget(self.overlap_combo, 1)
        lay.addLayout(row)
        root.addWidget(objects)
        self.hidden: set[int] = set()  # objects not shown (their colour is transparent)

        prompts = QGroupBox("Prompts on the current slice")
        row = QHBoxLayout(prompts)
        for text, slot, tip in (
            ("Box", self.activate_box_tool, "Draw a box around the structure (rectangle tool)"),
            ("+ Point", lambda: self.activate_point_tool(True), "Click inside the structure"),
            ("- Point", lambda: self.activate_point_tool(False), "Click on what must be excluded"),
            ("Clear prompts", self.clear_prompts_on_slice, "Remove the prompts of this slice"),
        ):
            b = QPushButton(text)
            b.setToolTip(tip)
            b.clicked.connect(slot)
            row.addWidget(b)
        root.addWidget(prompts)

        actions = QGroupBox("Segment")
        grid = QGridLayout(actions)
        self.buttons: dict[str, QPushButton] = {}
        specs = [
            ("segment", "Segment slice [S]", self.segment_slice, 0, 0),
            ("accept", "Accept [A]", self.accept, 0, 1),
            ("both", "Propagate ↕ [P]", lambda: self.propagate("both"), 1, 0),
            ("up", "Up ↑ [U]", lambda: self.propagate("up"), 1, 1),
            ("down", "Down ↓ [D]", lambda: self.propagate("down"), 1, 2),
            ("stop", "Stop here [X]", self.stop_here, 0, 2),
            ("undo", "Undo [Ctrl+Z]", self.undo, 2, 0),
            ("redo", "Redo", self.redo, 2, 1),
            ("clear", "Clear object [C]", self.clear_object, 2, 2),
        ]
        for key, text, slot, r, c in specs:
            b = QPushButton(text)
            b.clicked.connect(lambda _=False, s=slot: s())
            grid.addWidget(b, r, c)
            self.buttons[key] = b
        self.repropagate_check = QCheckBox("Re-propagate after a correction")
        self.repropagate_check.setChecked(True)
        grid.addWidget(self.repropagate_check, 3, 0, 1, 3)
        self.precompute_btn = QPushButton("Precompute embeddings")
        self.precompute_btn.setToolTip("Encode every slice in the background, so later prompts only decode.")
        self.precompute_btn.clicked.connect(lambda: self.precompute())
        grid.addWidget(self.precompute_btn, 4, 0, 1, 2)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        grid.addWidget(self.cancel_btn, 4, 2)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.progress.setFormat("%v / %m")
        grid.addWidget(self.progress, 5, 0, 1, 3)
        self.progress_label = QLabel("")
        grid.addWidget(self.progress_label, 6, 0, 1, 3)
        root.addWidget(actions)

        review = QGroupBox("Review")
        lay = QVBoxLayout(review)
        self.confidence_strip = ConfidenceStrip(self._strip_clicked)
        lay.addWidget(self.confidence_strip)
        row = QHBoxLayout()
        self.review_btn = QPushButton("Least sure slice [G]")
        self.review_btn.setToolTip("Go to the least confident propagated slice you have not reviewed yet.")
        self.review_btn.clicked.connect(lambda: self.review_next())
        self.review_label = QLabel("Propagate an object to see how sure each slice is.")
        self.review_label.setWordWrap(True)
        row.addWidget(self.review_btn)
        row.addWidget(self.review_label, 1)
        lay.addLayout(row)
        root.addWidget(review)

        export = QGroupBox("Save")
        row = QHBoxLayout(export)
        self.export_btn = QPushButton("Export label map…")
        self.export_btn.clicked.connect(lambda: self.export())
        self.per_object_check = QCheckBox("+ one file per object")
        self.restore_btn = QPushButton("Restore autosave")
        self.restore_btn.setEnabled(False)
        self.restore_btn.clicked.connect(lambda: self.restore_autosave())
        row.addWidget(self.export_btn)
        row.addWidget(self.per_object_check)
        row.addWidget(self.restore_btn)
        root.addWidget(export)
        # The autosave offer lives in the panel, where napari's own notifications cannot hide it.
        self.restore_banner = QLabel("")
        self.restore_banner.setWordWrap(True)
        self.restore_banner.setStyleSheet("background: #7a5c00; color: white; padding: 4px;")
        self.restore_banner.setVisible(False)
        root.addWidget(self.restore_banner)

        self.status = QLabel("Open a scan (File > Open, or File > Open Sample > MedSAM).")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        keys = ", ".join(f"{k}: {d}" for k, (_, _, d) in SHORTCUTS.items())
        self.setToolTip(f"Keyboard shortcuts — {keys}")
        root.addStretch(1)

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "MedSAM checkpoint", "", "Checkpoints (*.pth *.pt *.ckpt)")
        if path:
            self.model_combo.setEditText(path)

    # ================================================================== key bindings
    def _bind_keys(self, target) -> None:
        for key, (method, args, _) in SHORTCUTS.items():
            def callback(_target=None, _m=method, _a=args):
                getattr(self, _m)(*_a)

            target.bind_key(key, callback, overwrite=True)
            self._bound_keys.append((target, key))

    def _unbind_keys(self) -> None:
        for target, key in self._bound_keys:
            try:
                target.bind_key(key, None)
            except Exception:
                pass
        self._bound_keys.clear()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.cancel()
        self._unbind_keys()
        for emitter, slot in ((self.viewer.layers.events.inserted, self._refresh_scan_choices),
                              (self.viewer.layers.events.removed, self._on_layer_removed),
                              (self.viewer.dims.events.current_step, self._on_slice_changed)):
            try:
                emitter.disconnect(slot)
            except Exception:
                pass
        super().closeEvent(event)

    # ================================================================== scan / session
    def _image_layers(self):
        from napari.layers import Image

        return [l for l in self.viewer.layers if isinstance(l, Image) and l.ndim == 3 and not l.rgb]

    def _refresh_scan_choices(self, event=None) -> None:
        current = self.scan_combo.currentText()
        self.scan_combo.clear()
        names = [l.name for l in self._image_layers()]
        self.scan_combo.addItems(names)
        if current in names:
            self.scan_combo.setCurrentText(current)
        if self.session is None and event is not None:
            layer = getattr(event, "value", None)
            if layer is not None and META_VOLUME in getattr(layer, "metadata", {}):
                self.start_session(layer)

    def _on_layer_removed(self, event=None) -> None:
        self._refresh_scan_choices()
        layer = getattr(event, "value", None)
        if layer is not None and layer is self.image_layer:
            self.cancel()
            self.session = None
            self.image_layer = None
            self._set_status("The scan was closed. Open another scan and press 'Use this scan'.")

    def _volume_of(self, layer):
        """The source Volume of an image layer (from the reader), or one built from its transform."""
        from ..io import Volume
        from ..io.orientation import SliceView

        vol = layer.metadata.get(META_VOLUME)
        if vol is not None:
            return vol, layer.metadata.get(META_AXIS, "axial")
        # A layer from another reader: read its transform as the axial display frame (S, P, L).
        ras_to_display = SliceView(np.eye(4), shape=(2, 2, 2), axis="axial").ras_to_display
        # data -> world matrix from public calls only (plugins get a public-only proxy of layers)
        origin = np.asarray(layer.data_to_world(np.zeros(3)), dtype=np.float64)[-3:]
        data2world = np.eye(4)
        data2world[:3, 3] = origin
        for d in range(3):
            data2world[:3, d] = np.asarray(layer.data_to_world(np.eye(3)[d]), dtype=np.float64)[-3:] - origin
        affine = np.linalg.inv(ras_to_display) @ data2world
        data = np.asarray(layer.data)
        modality = "CT" if np.nanmin(data) < -500 else "MR"
        return Volume(data_ijk=data, affine_ras=affine, modality=modality, modality_source="guess"), "axial"

    def start_session(self, layer=None) -> bool:
        """Start segmenting `layer` (default: the image chosen in the panel). Returns success."""
        from ..engine.session import SegmentationSession

        if self._busy():
            return False
        if layer is None:
            name = self.scan_combo.currentText()
            if not name or name not in self.viewer.layers:
                _notify("warning", "No 3D image is open: open a CT or MRI scan first (File > Open), then press 'Use this scan'.")
                return False
            layer = self.viewer.layers[name]
        try:
            volume, axis = self._volume_of(layer)
            window = self._current_window(volume.modality)
            self.session = SegmentationSession(volume, model=self.model_name(), device=self.device_name(),
                                               axis=axis, window=window,
                                               loaded_model=self._loaded_models.get((self.model_name(), self.device_name())),
                                               cache_dir=self.embedding_cache)
        except Exception as exc:
            _notify("error", f"Could not start on '{layer.name}': {exc}")
            return False
        if tuple(self.session.shape_zyx) != tuple(layer.data.shape):
            _notify("error", f"The layer '{layer.name}' has shape {layer.data.shape}, but its scan's view is "
                             f"{self.session.shape_zyx}. Open the scan again with the MedSAM reader.")
            self.session = None
            return False
        self.image_layer = layer
        self.scan_combo.setCurrentText(layer.name)
        if volume.modality == "MR":
            self.window_combo.blockSignals(True)
            self.window_combo.setCurrentText("mr")
            self.window_combo.blockSignals(False)
        self.prompts.clear()
        self.pending = None
        self._propagated.clear()
        self.reviewed.clear()
        self.current_label = None
        self.object_list.clear()
        self.hidden.clear()
        self._make_layers()
        self.session.set_overlap(OVERLAP_CHOICES[self.overlap_combo.currentText()])  # the panel's choice holds
        self._refresh_review()
        self._set_status(f"Scan: {volume.describe()}. Draw a box (or click points) on a slice, then press S.")
        self.autosave_folder = None
        src = layer.metadata.get(META_SOURCE) or (str(volume.source_path) if volume.source_path else None)
        if src and Path(src).exists():
            try:
                self.autosave_folder = _autosave.autosave_dir(src)
            except OSError:
                self.autosave_folder = None
        self.restore_btn.setEnabled(False)
        self.restore_banner.setVisible(False)
        self.offered_folder = None
        if self.autosave_folder is not None and _autosave.exists(self.autosave_folder):
            if self.autosave_policy == "restore":
                self.restore_autosave()
            elif self.autosave_policy == "ask":
                try:  # new work autosaves beside it, never over it, until the user restores it
                    self.offered_folder = _autosave.keep_offered(self.autosave_folder)
                except OSError:
                    self.offered_folder = self.autosave_folder
                self.restore_btn.setEnabled(True)
                when = ""
                try:
                    when = " on " + _autosave.load(self.offered_folder)[1].get("saved_at", "")
                except Exception:
                    pass
                text = (f"Earlier work on '{Path(src).name}' was autosaved{when}. Press 'Restore autosave' to "
                        "bring it back; it stays available while you work.")
                self.restore_banner.setText(text)
                self.restore_banner.setVisible(True)
                _notify("info", text)
        return True

    def _layer_kwargs(self) -> dict:
        return dict(layer_geometry(self.session.view))

    def _make_layers(self) -> None:
        """Create (or reset) the Labels and prompt layers over the session's scan."""
        for name in (LAYER_LABELS, LAYER_PENDING, LAYER_OVERLAPS, LAYER_ORIENTATION, LAYER_BOX, LAYER_BG, LAYER_FG):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        geo = self._layer_kwargs()
        s = self.session
        meta = {META_VOLUME: s.volume, META_AXIS: s.view.axis, META_NAMES: {}, META_COLORS: {},
                META_TRUE_AFFINE: np.asarray(s.view.display_affine, dtype=np.float64)}
        self._updating = True
        try:
            self.labels_layer = self.viewer.add_labels(s.labels.array.copy(), name=LAYER_LABELS, metadata=meta,
                                                       opacity=0.55, **geo)
            self.pending_layer = self.viewer.add_labels(np.zeros_like(s.labels.array), name=LAYER_PENDING,
                                                        opacity=0.75, **geo)
            self.pending_layer.editable = False  # previews are made by the model, never painted
            self.overlap_layer = self.viewer.add_labels(np.zeros_like(s.labels.array), name=LAYER_OVERLAPS,
                                                        opacity=0.55, visible=False, **geo)
            self.overlap_layer.editable = False
            self.orientation_layer = self._add_orientation_markers(geo)
            self.box_layer = self.viewer.add_shapes(ndim=3, name=LAYER_BOX, edge_color="yellow", face_color="transparent",
                                                    edge_width=1.5, **geo)
            self.bg_layer = self.viewer.add_points(ndim=3, name=LAYER_BG, face_color="red", size=6,
                                                   border_color="white", **geo)
            self.fg_layer = self.viewer.add_points(ndim=3, name=LAYER_FG, face_color="lime", size=6,
                                                   border_color="white", **geo)
        finally:
            self._updating = False
        for layer in (self.box_layer, self.bg_layer, self.fg_layer):
            layer.projection_mode = "none"
        self.labels_layer.events.paint.connect(self._on_paint)
        for layer in (self.labels_layer, self.pending_layer, self.box_layer, self.bg_layer, self.fg_layer,
                      self.image_layer):
            self._bind_keys(layer)
        self.box_layer.mode = "add_rectangle"
        self.viewer.layers.selection.active = self.box_layer
        # The slider names what it moves through (napari's default label is "-3").
        self.viewer.dims.axis_labels = ("slice", *self.viewer.dims.axis_labels[1:])
        from qtpy.QtCore import QTimer

        # Once the dock has taken its room, fit the scan into what is left of the canvas.
        QTimer.singleShot(0, self._fit_view)

    def _fit_view(self) -> None:
        try:
            self.viewer.reset_view()
        except Exception:  # the viewer is closing
            pass

    def _add_orientation_markers(self, geo: dict):
        """A 2D Points layer of text only: the patient directions at the four edges of every slice."""
        _, h, w = self.session.shape_zyx
        top, bottom, left, right = EDGE_LETTERS.get(self.session.view.axis, EDGE_LETTERS["axial"])
        pad = 0.04 * max(h, w)  # just inside the slice's edges, where the canvas never clips them
        yx = np.array([[pad, (w - 1) / 2], [h - 1 - pad, (w - 1) / 2], [(h - 1) / 2, pad], [(h - 1) / 2, w - 1 - pad]])
        layer = self.viewer.add_points(
            yx, name=LAYER_ORIENTATION, size=0.01, face_color="transparent", border_width=0,
            features={"letter": [top, bottom, left, right]},
            text={"string": "{letter}", "color": "yellow", "size": 14, "anchor": "center"},
            scale=geo["scale"][1:], translate=geo["translate"][1:])
        layer.editable = False
        return layer

    # ================================================================== settings
    def model_name(self) -> str:
        return self.model_combo.currentText().strip() or DEFAULT_MODEL

    def device_name(self) -> str:
        return self.device_combo.currentText()

    def change_model(self) -> None:
        """Use the model/device now chosen; labels, objects, seeds, stop slices and undo history are kept
        (embeddings are not)."""
        s = self.session
        if s is None or (s.model_name, s.device) == (self.model_name(), self.device_name()):
            return
        if self._busy():
            _notify("warning", "The model can change once the running work ends (or press Cancel).")
            return
        self._sync_paint()
        self._accept_pending()  # a preview of the old model is kept as the user saw it
        s.set_model(self.model_name(), self.device_name(),
                    loaded_model=self._loaded_models.get((self.model_name(), self.device_name())))
        self._set_status(f"Model {self.model_name()} on {self.device_name()}: it loads with the next segmentation.")

    def _current_window(self, modality: str = "CT"):
        choice = self.window_combo.currentText()
        if choice == "mr" or modality == "MR":
            return "mr"
        if choice == "custom":
            return (self.level_spin.value(), self.width_spin.value())
        return WINDOWS[choice]

    def _on_window_choice(self, choice: str) -> None:
        custom = choice == "custom"
        self.level_spin.setEnabled(custom)
        self.width_spin.setEnabled(custom)
        if choice in WINDOWS:
            level, width = WINDOWS[choice]
            self.level_spin.setValue(level)
            self.width_spin.setValue(width)
        self.set_window(choice)

    def set_window(self, choice: str, level: float | None = None, width: float | None = None) -> None:
        """Intensity preset ("abdomen", "lung", "brain", "bone", "custom", "mr") for display and model.

        Changing the window changes what the model sees, so cached slice embeddings are dropped.
        """
        if choice == "custom" and level is not None and width is not None:
            self.level_spin.setValue(level)
            self.width_spin.setValue(width)
        if self.window_combo.currentText() != choice:
            self.window_combo.blockSignals(True)
            self.window_combo.setCurrentText(choice)
            self.window_combo.blockSignals(False)
            self.level_spin.setEnabled(choice == "custom")
            self.width_spin.setEnabled(choice == "custom")
        if self.session is None or self._busy():
            return
        window = self._current_window(self.session.modality)
        if window == self.session.window:
            return
        try:
            self.session.set_window(window)
        except Exception as exc:
            _notify("error", f"Could not apply the intensity window: {exc}")
            return
        if window != "mr" and self.image_layer is not None:
            lv, wd = window
            self.image_layer.contrast_limits = (lv - wd / 2.0, lv + wd / 2.0)

    # ================================================================== objects
    def _color(self, label_id: int):
        obj = self.session.labels.objects.get(label_id) if self.session else None
        if obj is not None:
            return obj.color
        from ..io.colors import default_label_color

        return default_label_color(label_id)

    def _refresh_objects(self) -> None:
        """Rebuild the list, the Labels colormap and the writer metadata from the session."""
        if self.session is None:
            return
        from napari.utils.colormaps import DirectLabelColormap

        objs = self.session.labels.objects
        self.object_list.blockSignals(True)
        self.object_list.clear()
        voxel_ml = self.voxel_ml()
        counts = np.bincount(self.session.labels.array.ravel(), minlength=max(objs, default=0) + 1)
        for label_id, obj in sorted(objs.items()):
            ml = float(counts[label_id]) * voxel_ml if self.session.overlap != "allow" else \
                float(self.session.object_mask(label_id).sum()) * voxel_ml
            lock = " · locked" if label_id in self.session.locked else ""
            item = QListWidgetItem(_swatch(obj.color), f"{obj.name}{VOLUME_SUFFIX}{ml:.1f} mL{lock}")
            item.setData(Qt.UserRole, label_id)
            item.setToolTip(f"label id {label_id}; {ml:.2f} mL")
            item.setFlags(item.flags() | Qt.ItemIsEditable | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Unchecked if label_id in self.hidden else Qt.Checked)
            self.object_list.addItem(item)
            if label_id == self.current_label:
                self.object_list.setCurrentItem(item)
        self.object_list.blockSignals(False)
        if self.labels_layer is not None:
            colors = {None: np.array([1.0, 1.0, 1.0, 1.0]), 0: np.zeros(4)}
            for label_id, obj in objs.items():
                alpha = 0.0 if label_id in self.hidden else 1.0
                colors[label_id] = np.array([*(c / 255.0 for c in obj.color[:3]), alpha])
            self.labels_layer.colormap = DirectLabelColormap(color_dict=colors)
            self.pending_layer.colormap = DirectLabelColormap(color_dict=colors)
            if self.overlap_layer is not None:
                self.overlap_layer.colormap = DirectLabelColormap(color_dict=colors)
            self.labels_layer.metadata[META_NAMES] = {k: o.name for k, o in objs.items()}
            self.labels_layer.metadata[META_COLORS] = {k: tuple(o.color) for k, o in objs.items()}
            self.labels_layer.metadata[META_MODEL] = self.model_name()  # a DICOM SEG names the algorithm's model
            if self.current_label is not None:
                self.labels_layer.selected_label = self.current_label
        self._refresh_review()

    def add_object(self, name: str | None = None) -> int | None:
        """Add an object (its own label id and colour) and make it current; returns its id."""
        if not self._ready("add an object"):
            return None
        obj = self.session.add_object(name=name)
        self.select_object(obj.label_id)
        self._autosave()
        self._set_status(f"New object '{obj.name}' (label {obj.label_id}): box or click it on a slice, then press S.")
        return obj.label_id

    def rename_object(self, label_id: int, name: str) -> None:
        if self.session is None or label_id not in self.session.labels.objects or not name.strip():
            return
        self.session.rename(label_id, name)
        self._refresh_objects()
        self._autosave()

    def voxel_ml(self) -> float:
        """The volume of one voxel in millilitres."""
        spacing = np.linalg.norm(np.asarray(self.session.view.view_affine, dtype=np.float64)[:3, :3], axis=0)
        return float(np.prod(spacing)) / 1000.0

    def object_volume_ml(self, label_id: int) -> float:
        return float(self.session.object_mask(label_id).sum()) * self.voxel_ml()

    def set_object_visible(self, label_id: int, visible: bool) -> None:
        """Show or hide one object in the Labels layer (its voxels stay; export is unchanged)."""
        (self.hidden.discard if visible else self.hidden.add)(int(label_id))
        self._refresh_objects()

    def toggle_lock(self, label_id: int | None = None, locked: bool | None = None) -> None:
        """Lock an object (nothing may change it: no segmenting, propagating, painting, clearing, nor
        overwriting by others) or unlock it."""
        if self.session is None:
            return
        label_id = self.current_label if label_id is None else int(label_id)
        if label_id not in self.session.labels.objects:
            return
        locked = (label_id not in self.session.locked) if locked is None else locked
        (self.session.locked.add if locked else self.session.locked.discard)(label_id)
        self._refresh_objects()
        name = self.session.labels.objects[label_id].name
        self._set_status(f"'{name}' is locked: nothing changes it until you unlock it." if locked
                         else f"'{name}' is unlocked.")

    def set_object_color(self, label_id: int, rgb) -> None:
        if self.session is None or label_id not in self.session.labels.objects:
            return
        self.session.labels.objects[label_id].color = tuple(int(c) for c in rgb[:3])
        self._refresh_objects()
        self._autosave()

    def _color_clicked(self) -> None:
        if self.session is None or self.current_label is None:
            return
        color = QColorDialog.getColor(QColor(*self._color(self.current_label)[:3]), self, "Object colour")
        if color.isValid():
            self.set_object_color(self.current_label, (color.red(), color.green(), color.blue()))

    def set_overlap(self, mode: str) -> None:
        """The overlap rule for new results: "none", "all" or "allow" (see OVERLAP_CHOICES)."""
        if self.session is None:
            return
        self.session.set_overlap(mode)
        text = {v: k for k, v in OVERLAP_CHOICES.items()}[mode]
        if self.overlap_combo.currentText() != text:
            self.overlap_combo.blockSignals(True)
            self.overlap_combo.setCurrentText(text)
            self.overlap_combo.blockSignals(False)
        self._refresh_objects()
        self._show_labels()

    def _rename_clicked(self) -> None:
        if self.current_label is None or self.session is None:
            return
        old = self.session.labels.objects[self.current_label].name
        name, ok = QInputDialog.getText(self, "Rename object", "Name:", text=old)
        if ok:
            self.rename_object(self.current_label, name)

    def _on_object_renamed(self, item) -> None:
        label_id = item.data(Qt.UserRole)
        if label_id is None or self.session is None or int(label_id) not in self.session.labels.objects:
            return
        label_id = int(label_id)
        visible = item.checkState() == Qt.Checked
        if visible == (label_id in self.hidden):  # the tick box changed
            self.set_object_visible(label_id, visible)
            return
        name = item.text().split(VOLUME_SUFFIX)[0]
        if name != self.session.labels.objects[label_id].name:
            self.rename_object(label_id, name)

    def delete_object(self, label_id: int | None = None) -> None:
        """Remove an object and its voxels (the voxel removal is undoable)."""
        if not self._ready("delete an object"):
            return
        label_id = self.current_label if label_id is None else label_id
        if label_id is None or label_id not in self.session.labels.objects:
            return
        self._sync_paint()
        self._drop_pending()
        self.session.remove_object(label_id)
        self.prompts.pop(label_id, None)
        self._propagated.discard(label_id)
        if self.current_label == label_id:
            self.current_label = None
            self._load_prompts(None)
            remaining = sorted(self.session.labels.objects)
            if remaining:
                self.select_object(remaining[0])
        self._refresh_objects()
        self._show_labels()
        self._autosave()

    def _on_object_item(self, item, previous=None) -> None:
        if item is not None and not self._updating:
            self.select_object(int(item.data(Qt.UserRole)))

    def select_object(self, label_id: int) -> None:
        """Make `label_id` the object that prompts, segmenting and painting apply to."""
        if self.session is None or label_id not in self.session.labels.objects:
            return
        if label_id != self.current_label:
            first = self.current_label is None  # prompts drawn before any object belong to this one
            self._store_prompts()
            self._drop_pending()
            self.current_label = label_id
            if not first or label_id in self.prompts:
                self._load_prompts(label_id)
        self._refresh_objects()

    def _ensure_object(self) -> int:
        if self.current_label is None or self.current_label not in self.session.labels.objects:
            existing = sorted(self.session.labels.objects)
            if existing:
                self.select_object(existing[0])
            else:
                self.add_object()
        return self.current_label

    # ================================================================== prompts
    def _store_prompts(self) -> None:
        if self.current_label is None or self.fg_layer is None:
            return
        self.prompts[self.current_label] = {
            "fg": np.asarray(self.fg_layer.data, dtype=np.float64).copy(),
            "bg": np.asarray(self.bg_layer.data, dtype=np.float64).copy(),
            "boxes": [np.asarray(b, dtype=np.float64).copy() for b in self.box_layer.data],
        }

    def _load_prompts(self, label_id: int | None) -> None:
        if self.fg_layer is None:
            return
        p = self.prompts.get(label_id, {}) if label_id is not None else {}
        self._updating = True
        try:
            self.fg_layer.data = np.asarray(p.get("fg", np.zeros((0, 3)))).reshape(-1, 3)
            self.bg_layer.data = np.asarray(p.get("bg", np.zeros((0, 3)))).reshape(-1, 3)
            self.box_layer.data = []
            boxes = [np.asarray(b) for b in p.get("boxes", [])]
            if boxes:
                self.box_layer.add_rectangles(boxes, edge_color="yellow", face_color="transparent", edge_width=1.5)
        finally:
            self._updating = False

    def current_z(self) -> int:
        """The slice index (view frame) shown by the viewer."""
        layer = self.image_layer
        z = layer.world_to_data(self.viewer.dims.point)[0] if layer is not None else self.viewer.dims.current_step[0]
        n = self.session.shape_zyx[0] if self.session else 1
        return int(np.clip(round(float(z)), 0, n - 1))

    def set_slice(self, z: int) -> None:
        """Show slice z (view frame)."""
        world = self.image_layer.data_to_world(np.array([z, 0, 0], dtype=float))
        point = list(self.viewer.dims.point)
        point[0] = float(world[0])
        self.viewer.dims.point = point

    def _prompts_on_slice(self, z: int):
        """(points_yx (N,2), point_labels (N,), box_xyxy or None) of the prompt layers on slice z."""
        points_yx, labels, box, self._box_note = prompts_on_slice(
            self.fg_layer.data, self.bg_layer.data, self.box_layer.data, z, self.session.shape_zyx[1:])
        return points_yx, labels, box

    def add_box(self, box_xyxy, z: int | None = None) -> None:
        """Add a box prompt (x0, y0, x1, y1 slice pixels) on slice z (default: the current one)."""
        z = self.current_z() if z is None else int(z)
        x0, y0, x1, y1 = [float(v) for v in box_xyxy]
        rect = np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]], dtype=np.float64)
        self.box_layer.add_rectangles([rect], edge_color="yellow", face_color="transparent", edge_width=1.5)

    def add_point(self, yx, positive: bool = True, z: int | None = None) -> None:
        """Add a foreground (positive) or background point (row, col) on slice z."""
        z = self.current_z() if z is None else int(z)
        layer = self.fg_layer if positive else self.bg_layer
        layer.add(np.array([[z, float(yx[0]), float(yx[1])]]))

    def activate_box_tool(self) -> None:
        if self.box_layer is not None:
            self.viewer.layers.selection.active = self.box_layer
            self.box_layer.mode = "add_rectangle"

    def activate_point_tool(self, positive: bool = True) -> None:
        layer = self.fg_layer if positive else self.bg_layer
        if layer is not None:
            self.viewer.layers.selection.active = layer
            layer.mode = "add"

    def clear_prompts_on_slice(self, z: int | None = None) -> None:
        if self.fg_layer is None:
            return
        z = self.current_z() if z is None else z
        for layer in (self.fg_layer, self.bg_layer):
            data = np.asarray(layer.data).reshape(-1, 3)
            layer.data = data[np.round(data[:, 0]).astype(int) != z]
        keep = [s for s in self.box_layer.data if not np.all(np.round(np.asarray(s)[:, 0]).astype(int) == z)]
        self.box_layer.data = []
        if keep:
            self.box_layer.add_rectangles(keep, edge_color="yellow", face_color="transparent", edge_width=1.5)

    # ================================================================== labels display and painting
    def _preview_slice(self, label_id: int, mask_yx: np.ndarray) -> np.ndarray:
        """A pending-layer slice: `label_id` where `mask_yx` is set (what accepting it would try to claim)."""
        return np.where(mask_yx, label_id, 0).astype(self.pending_layer.data.dtype)

    def pending_layer_shows(self) -> bool:
        """Whether anything not accepted is on screen."""
        return self.pending_layer is not None and bool(np.asarray(self.pending_layer.data).any())

    def _show_labels(self) -> None:
        """Show the session's labels in the Labels layer, and only the pending preview in the pending layer."""
        if self.labels_layer is None:
            return
        self._updating = True
        try:
            self.labels_layer.data[...] = self.session.labels.array
            self.labels_layer.refresh()
            pend = self.pending_layer.data
            if pend.any():
                pend[...] = 0
            if self.pending is not None:
                label_id, pred = self.pending
                pend[pred.z] = self._preview_slice(label_id, pred.mask_yx)
            self.pending_layer.refresh()
            self._show_overlaps()
        finally:
            self._updating = False

    def _show_overlaps(self) -> None:
        """"allow overlap": show each object's voxels that the label map gives to another object."""
        layer = self.overlap_layer
        if layer is None:
            return
        over = layer.data
        if over.any():
            over[...] = 0
        for label_id, by_z in self.session.overlaps.items():
            for z, extra in by_z.items():
                over[z][extra] = label_id
        layer.visible = self.session.overlap == "allow" and bool(over.any())
        layer.refresh()

    def _show_pending_slice(self, z: int, slice_yx: np.ndarray, only: bool = False) -> None:
        """Draw slice z of the pending layer (with `only`, clear the rest first)."""
        self._updating = True
        try:
            pend = self.pending_layer.data
            if only and pend.any():
                pend[...] = 0
            pend[z] = slice_yx
            self.pending_layer.refresh()
        finally:
            self._updating = False

    def _on_paint(self, event=None) -> None:
        # napari emits `paint` just before it writes the voxels: sync on the next event-loop turn.
        if self._updating or self.session is None or self._busy():
            return
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, self._paint_finished)

    def _paint_finished(self) -> None:
        if self._updating or self.session is None or self._busy():
            return
        if self._sync_paint():
            self._autosave()

    def _sync_paint(self) -> int:
        """Push the user's painting in the Labels layer into the session (undoable); returns voxels changed."""
        if self.session is None or self.labels_layer is None:
            return 0
        data = np.asarray(self.labels_layer.data)
        painted = data != self.session.labels.array
        if not painted.any():
            return 0
        if self.session.locked:
            locked = list(self.session.locked)
            touched = painted & (np.isin(self.session.labels.array, locked) | np.isin(data, locked))
            if touched.any():  # put a locked object's voxels back as they were
                self._updating = True
                try:
                    self.labels_layer.data[touched] = self.session.labels.array[touched]
                    self.labels_layer.refresh()
                finally:
                    self._updating = False
                _notify("warning", "Painting does not change a locked object: unlock it first (Lock).")
                data = np.asarray(self.labels_layer.data)
                painted = data != self.session.labels.array
                if not painted.any():
                    return 0
        if self.pending is not None:  # painting while a preview shows accepts it first
            self._accept_pending()
            data = np.where(painted, data, self.session.labels.array)  # the brush strokes win over it
        # session.paint remembers each object's brush edits, so a later propagation keeps them
        changed = self.session.paint(data, what="paint")
        self._refresh_objects()
        return changed

    # ================================================================== tasks
    def _busy(self) -> bool:
        return self.task is not None and self.task.running

    def _ready(self, what: str) -> bool:
        if self.session is None:
            _notify("warning", f"To {what}, open a CT or MRI scan first (File > Open, or File > Open Sample > "
                               "MedSAM > Abdominal CT) and choose it in the MedSAM panel.")
            return False
        if self._busy():
            _notify("warning", f"'{self.task.description}' is still running: wait for it to finish or press Cancel.")
            return False
        return True

    def _run(self, make_gen, description, on_yield=None, on_return=None, on_finish=None):
        self._set_busy(True, description)
        started = time.perf_counter()
        self.progress.setRange(0, 0)
        self.progress_label.setText(description)

        def yielded(progress):
            self._show_progress(progress, started)
            if on_yield is not None:
                on_yield(progress)

        def on_error(exc):
            log.exception("%s failed", description, exc_info=exc)
            self._set_status(f"{description} failed: {exc}")  # not a stale "…ing" line
            _notify("error", f"{description} failed: {exc}")

        def finished(cancelled):
            self._set_busy(False)
            if on_finish is not None:
                on_finish(cancelled)

        self.task = start_task(make_gen, description, on_yield=yielded, on_return=on_return, on_error=on_error,
                               on_finish=finished, inline=self.inline)
        return self.task

    def _show_progress(self, progress, started: float) -> None:
        """The panel's bar: slices done of about how many, and the time left at the pace so far."""
        done, total = getattr(progress, "done", None), getattr(progress, "total", None)
        if done is None or not total:
            return
        self.progress.setRange(0, int(total))
        self.progress.setValue(min(int(done), int(total)))
        elapsed = time.perf_counter() - started
        left = elapsed / done * (total - done) if done else None
        eta = f", about {left:.0f} s left" if left is not None and done < total else ""
        # the engine's message names the slice ("slice 19"); the count is of slices to visit
        self.progress_label.setText(f"{getattr(progress, 'message', '') or 'working'}: {int(done)} of "
                                    f"~{int(total)} slices{eta}")

    def _set_busy(self, busy: bool, description: str = "") -> None:
        self.progress.setVisible(busy)
        self.progress_label.setVisible(busy)
        self.cancel_btn.setEnabled(busy)
        for b in self.buttons.values():
            b.setEnabled(not busy)
        self.precompute_btn.setEnabled(not busy)
        self.export_btn.setEnabled(not busy)
        if self.labels_layer is not None:
            self.labels_layer.editable = not busy
        if busy:
            self._set_status(f"{description}… (Cancel stops it; nothing is changed until it finishes)")

    def wait(self, timeout_s: float = 120.0) -> bool:
        """Block (processing Qt events) until the running task ends; True when it ended."""
        from qtpy.QtWidgets import QApplication

        end = time.perf_counter() + timeout_s
        while self._busy() and time.perf_counter() < end:
            QApplication.processEvents()
            time.sleep(0.005)
        QApplication.processEvents()
        return not self._busy()

    def cancel(self) -> None:
        """Stop the running task at its next step; a cancelled propagation changes nothing."""
        if self._busy():
            self.task.cancel()
            self._set_status(f"Cancelling '{self.task.description}'…")

    def use_loaded_model(self, loaded) -> None:
        """Use an already loaded model (`model.registry.LoadedModel`) for the current model/device choice."""
        self._loaded_models[(self.model_name(), self.device_name())] = loaded
        s = self.session
        if (s is not None and not s.model_loaded and self.image_layer is not None and not s.labels.objects
                and not s.labels.array.any()):
            self.start_session(self.image_layer)  # nothing done yet: restart with the model

    def _remember_model(self) -> None:
        predictor = getattr(self.session, "_predictor", None)
        if predictor is not None:
            self._loaded_models[(self.model_name(), self.device_name())] = predictor.loaded

    # ================================================================== segment one slice
    def segment_slice(self):
        """Segment the current object on the current slice from the prompts on that slice.

        With a box: box (+ points). With points only on a slice the object already covers: a
        correction (points + the current mask), accepted and re-propagated when the
        "Re-propagate after a correction" box is ticked.
        """
        if not self._ready("segment a slice"):
            return None
        t0 = time.perf_counter()
        self._sync_paint()
        z = self.current_z()
        points_yx, point_labels, box = self._prompts_on_slice(z)
        if points_yx is None and box is None:
            _notify("warning", f"Slice {z} has no prompt: draw a box around the structure (Box tool) or click "
                               "inside it (+ Point tool), then press S.")
            return None
        if self._box_note == "outside":
            _notify("warning", f"The box on slice {z} lies (almost) outside the image: draw it around the "
                               "structure inside the scan, then press S.")
            return None
        label_id = self._ensure_object()  # only now: a refused S must not leave an empty object behind
        if self._refuse_locked(label_id):
            return None
        if self.pending is not None and self.pending[1].z == z and self.pending[0] == label_id and box is None:
            self._accept_pending()  # refine what is shown rather than start over
        covers = bool((self.session.labels.array[z] == label_id).any())
        correction = box is None and covers
        session = self.session
        if box is None and not self._model_reads_points():
            _notify("warning", f"The model '{self.model_name()}' was trained with boxes only and does not answer "
                               "clicks reliably: draw a box around the structure, or choose the model "
                               "'medsam_interactive', which is trained for clicks and corrections.")

        def work(cancel):
            from ..engine.propagation import Progress

            if not session.model_loaded:
                yield Progress(0, 2, f"loading model {session.model_name}")
                session.predictor  # noqa: B018 (loads the model in this thread)
            if not session.predictor.has_embedding(z):
                yield Progress(1, 2, f"encoding slice {z}")
            return session.segment_slice(label_id, z, points_yx=points_yx, point_labels=point_labels, box_xyxy=box,
                                         use_current_mask=correction, commit=False)

        box_note = self._box_note

        def done(pred):
            if self.session is not session:  # the scan was closed meanwhile
                return
            self._remember_model()
            if self.pending is not None and (self.pending[0], self.pending[1].z) != (label_id, z):
                self._accept_pending()  # moving on from an unaccepted slice keeps it
            self.pending = (label_id, pred)
            self._show_pending_slice(z, self._preview_slice(label_id, pred.mask_yx), only=True)
            self._autosave()  # the object in progress survives a crash
            dt = time.perf_counter() - t0
            self.timings["segment_s"].append(dt)
            what = "corrected" if correction else "segmented"
            clipped = " (the box was clipped to the image)" if box_note == "clipped" else ""
            self._set_status(f"Slice {z} {what}{clipped} ({int(pred.mask_yx.sum())} px, predicted IoU {pred.iou:.2f}, "
                             f"{dt * 1000:.0f} ms). A accepts, P propagates, more clicks refine.")
            if correction and label_id in self._propagated and self.repropagate_check.isChecked():
                self.pending = None  # the session takes it as the correction's seed
                from qtpy.QtCore import QTimer

                # Only the neighbours the correction really changes are redone; one undo step for all.
                QTimer.singleShot(0, lambda: self.propagate("both", from_slice=z, correction=pred))

        self._run(work, f"Segmenting slice {z}", on_return=done)
        return self.task

    def _withheld_note(self, label_id) -> str:
        """A sentence on what the overlap rule kept from the object's last commit (and a warning when it
        kept everything), or ""."""
        s = self.session
        if label_id is None or label_id not in s.labels.objects:
            return ""
        note = s.withheld_sentence(label_id)
        if note and s.overlap != "allow" and not (s.labels.array == label_id).any():
            note = f"'{s.labels.objects[label_id].name}' got no voxel: " + note
            _notify("warning", note)
        return note + " " if note else ""

    def _model_reads_points(self) -> bool:
        """Whether the chosen model was trained on point prompts (from its spec; loads nothing)."""
        s = self.session
        spec = s.predictor.spec if s is not None and s.model_loaded else None
        if spec is None:
            from ..model.registry import REGISTRY

            spec = REGISTRY.get(self.model_name())
        return spec is None or "points" in getattr(spec, "prompts", ("box", "points"))  # unknown files: no warning

    def _refuse_locked(self, label_id) -> bool:
        if self.session is not None and label_id in self.session.locked:
            _notify("warning", f"'{self.session.labels.objects[label_id].name}' is locked: unlock it (Lock) to change it.")
            return True
        return False

    def _accept_pending(self) -> bool:
        if self.pending is None:
            return False
        label_id, pred = self.pending
        self.pending = None
        accepted = label_id in self.session.labels.objects and label_id not in self.session.locked
        if accepted:
            self.session.accept(label_id, pred)
        # The Labels layer must show what the session now holds, or the next sync takes it for paint.
        self._updating = True
        try:
            self.labels_layer.data[pred.z] = self.session.labels.array[pred.z]
            self.labels_layer.refresh()
            self.pending_layer.data[pred.z] = 0
            self.pending_layer.refresh()
        finally:
            self._updating = False
        return accepted

    def _drop_pending(self) -> None:
        if self.pending is not None:
            self.pending = None
            self._show_labels()

    def accept(self) -> None:
        """Accept the shown slice result: it becomes a seed of the object and is autosaved."""
        if not self._ready("accept a result"):
            return
        self._sync_paint()
        label_id = self.pending[0] if self.pending is not None else None
        if self._accept_pending():
            self._show_labels()
            self._refresh_objects()
            self._autosave()
            self._set_status(f"Accepted. {self._withheld_note(label_id)}Propagate with P (both), U (up) or D (down).")
        else:
            self._set_status("Nothing to accept: segment a slice first (S).")

    # ================================================================== propagate
    def propagate(self, direction: str = "both", from_slice: int | None = None, correction=None):
        """Propagate the current object from its seeds (up, down or both), slice by slice.

        from_slice: after a correction there, re-propagate outwards only until the result agrees.
        correction: the corrected slice's SlicePrediction (on `from_slice`): accepted with the
            re-propagation as one undo step (`SegmentationSession.correct`).
        """
        if not self._ready("propagate"):
            return None
        self._sync_paint()
        if self.pending is None and (self.current_label is None or not self.session.seeds.get(self.current_label)):
            # nothing to work on: say so, and do not create an empty object
            _notify("warning", "This object has no segmented slice yet: box it on one slice, press S, then propagate.")
            return None
        label_id = self._ensure_object()
        if self._refuse_locked(label_id):
            return None
        self._accept_pending()
        if correction is None and not self.session.seeds.get(label_id):
            _notify("warning", "This object has no segmented slice yet: box it on one slice, press S, then propagate.")
            return None
        session = self.session
        self._show_labels()
        state = {"last": None, "result": None, "task": None}

        def work(cancel):
            from ..engine.propagation import Progress

            if not session.model_loaded:
                yield Progress(0, 1, f"loading model {session.model_name}")
                session.predictor  # noqa: B018
            state["last"] = time.perf_counter()
            # The session adds the object's stop slices to its stop rules itself.
            if correction is not None:
                result = yield from session.correct(label_id, correction, direction=direction, cancel=cancel)
            else:
                result = yield from session.propagate(label_id, direction=direction, cancel=cancel,
                                                      from_slice=from_slice)
            state["result"] = result  # committed: a Cancel arriving now is too late to undo it
            return result

        def live() -> bool:
            # Nothing of a cancelled run, or of a run on a scan since closed, may reach the layer.
            task = state["task"]
            return self.session is session and not (task is not None and task.cancel_event.is_set())

        def step(progress):
            if progress.z is None or progress.prediction is None or not live():
                return
            now = time.perf_counter()
            if state["last"] is not None:
                self.timings["propagation_step_s"].append(now - state["last"])
            self._show_pending_slice(progress.z, self._preview_slice(label_id, progress.prediction.mask_yx))
            state["last"] = time.perf_counter()

        def done(result):
            if self.session is not session:
                return
            self._remember_model()
            if result is None:  # a correction on an object the session had not propagated: the slice only
                self._show_labels()
                self._refresh_objects()
                self._autosave()
                self._set_status(f"Slice {correction.z} corrected. Propagate with P.")
                return
            self._propagated.add(label_id)
            # Slices this run rewrote need a new look; the others keep their review mark.
            self.reviewed.setdefault(label_id, set()).difference_update(result.predictions)
            self._show_labels()
            self._refresh_review()
            self._autosave()
            zs = result.slices
            why = "; ".join(f"{k}: {v}" for k, v in result.stopped.items())
            self._refresh_objects()
            self._set_status(f"Propagated to slices {zs[0]}–{zs[-1]} ({len(zs)} slices). {why}. "
                             f"{self._withheld_note(label_id)}Click points on a slice to correct it (S), or paint.")

        def finish(cancelled):
            if self.session is not session:
                return
            if cancelled and state["result"] is not None:
                # The run had committed before the cancel reached it: say so, and keep it undoable.
                done(state["result"])
                self._set_status(self.status.text() + " (Cancel came after the last slice; Ctrl+Z takes it back.)")
            elif cancelled:
                self._show_labels()  # the engine committed nothing: show the labels as they were
                kept = f" except the corrected slice {correction.z}" if correction is not None else ""
                self._set_status(f"Propagation cancelled: the labels are as they were before{kept}.")
                _notify("info", f"Propagation cancelled: the labels are as they were before{kept}.")

        state["task"] = self._run(work, f"Propagating {direction}", on_yield=step, on_return=done, on_finish=finish)
        return self.task

    def stop_here(self) -> None:
        """Mark the current slice as the object's end: clear it there and beyond (away from its seeds)."""
        if not self._ready("stop the object here"):
            return
        self._sync_paint()
        if self.current_label is None:
            _notify("warning", "Choose or add an object first: X ends the selected object at this slice.")
            return
        label_id = self._ensure_object()
        if self._refuse_locked(label_id):
            return
        self._accept_pending()
        z = self.current_z()
        self.session.stop_here(label_id, z)  # also records z as the object's stop slice
        self._show_labels()
        self._refresh_review()
        self._autosave()
        self._set_status(f"Object stops at slice {z}: later propagations will not enter it.")

    # ================================================================== review
    def _refresh_review(self) -> None:
        """Recompute the current object's confidence along z and redraw the strip."""
        label_id = self.current_label
        if self.session is None or label_id is None or label_id not in self.session.labels.objects:
            self._strip_data = ({}, (), self.session.shape_zyx[0] if self.session else 0)
        else:
            conf = self.session.confidence_of(label_id)
            self._strip_data = (conf, tuple(self.session.seeds.get(label_id, {})), self.session.shape_zyx[0])
            todo = self._to_review(label_id, conf)
            if conf and len(conf) > len(self._strip_data[1]):
                low = min(c for z, c in conf.items() if z not in self._strip_data[1])
                self.review_label.setText(f"{len(todo)} propagated slices not reviewed; lowest confidence {low:.2f}.")
            else:
                self.review_label.setText("Propagate an object to see how sure each slice is.")
        self._draw_strip()

    def _draw_strip(self) -> None:
        conf, seeds, n = self._strip_data
        current = self.current_z() if self.session is not None and self.image_layer is not None else None
        self.confidence_strip.show_image(render_confidence_strip(
            conf, n, seeds=seeds, reviewed=self.reviewed.get(self.current_label, ()), current=current), n)

    def _on_slice_changed(self, event=None) -> None:
        if self.session is not None and self.image_layer is not None:
            self._draw_strip()  # only the current-slice frame moves: no recomputation

    def _strip_clicked(self, z: int) -> None:
        if self.session is not None and self.image_layer is not None:
            self.set_slice(z)

    def _to_review(self, label_id: int, conf: dict[int, float]) -> dict[int, float]:
        """Propagated slices (not the user's seeds) of the object that have not been reviewed: z -> confidence."""
        seeds = self.session.seeds.get(label_id, {})
        done = self.reviewed.get(label_id, set())
        return {z: c for z, c in conf.items() if z not in seeds and z not in done}

    def review_next(self) -> int | None:
        """Show the current object's least confident propagated slice not yet reviewed, and mark it reviewed.

        Returns the slice, or None when every propagated slice has been reviewed. Correcting a
        slice (S) makes it a seed, which needs no review; a new propagation asks for the
        slices it rewrote to be reviewed again.
        """
        if not self._ready("review slices"):
            return None
        self._sync_paint()  # what the object holds now decides which slices are left to review
        label_id = self.current_label
        todo = self._to_review(label_id, self.session.confidence_of(label_id)) if label_id is not None else {}
        if not todo:
            self._set_status("Every propagated slice of this object has been reviewed."
                             if label_id in self._propagated else "Propagate the object first (P); then G shows "
                             "its least confident slices one by one.")
            return None
        z = min(todo, key=lambda k: (todo[k], k))
        self.reviewed.setdefault(label_id, set()).add(z)
        self.set_slice(z)
        sig = self.session.signals.get(label_id, {}).get(z)
        why = ""
        if sig is not None:
            why = (f" (predicted IoU {sig.predicted_iou:.2f}, overlap with the neighbour {sig.iou_previous:.2f}, "
                   f"stability {sig.stability:.2f}"
                   + (f", intensity {sig.intensity_shift:.1f} seed stds off" if sig.intensity_shift is not None else "")
                   + ")")
        self._set_status(f"Slice {z}: confidence {todo[z]:.2f}{why}; {len(todo) - 1} more to review. "
                         "Correct it with clicks (S), stop the object here (X), or press G for the next.")
        self._refresh_review()
        return z

    # ================================================================== history
    def undo(self) -> None:
        """Undo the last change (a pending preview first, then the session's history)."""
        if not self._ready("undo"):
            return
        self._sync_paint()
        if self.pending is not None:
            self._drop_pending()
            self._set_status("Discarded the slice preview.")
            return
        what = self.session.undo()  # seeds travel with the history
        self._show_labels()
        self._refresh_objects()
        if what:
            self._autosave()
        self._set_status(f"Undid: {what}." if what else "Nothing to undo.")

    def redo(self) -> None:
        if not self._ready("redo"):
            return
        self._sync_paint()
        what = self.session.redo()
        self._show_labels()
        self._refresh_review()
        if what:
            self._autosave()
        self._set_status(f"Redid: {what}." if what else "Nothing to redo.")

    def clear_object(self) -> None:
        """Remove all voxels, seeds, prompts and stop slices of the current object (undoable voxels)."""
        if not self._ready("clear an object"):
            return
        self._sync_paint()
        if self.current_label is None:
            return
        label_id = self.current_label
        if self._refuse_locked(label_id):
            return
        self._drop_pending()
        self.session.clear_object(label_id)  # also forgets its stop slices
        self._propagated.discard(label_id)
        self.reviewed.pop(label_id, None)
        self.prompts.pop(label_id, None)
        self._load_prompts(None)
        self._show_labels()
        self._refresh_objects()
        self._autosave()
        self._set_status("Object cleared (Ctrl+Z brings the voxels back).")

    # ================================================================== precompute
    def precompute(self):
        """Encode every slice in the background, with progress; cancellable."""
        if not self._ready("precompute embeddings"):
            return None
        session = self.session

        def work(cancel):
            from ..engine.propagation import Progress

            if not session.model_loaded:
                yield Progress(0, 1, f"loading model {session.model_name}")
                session.predictor  # noqa: B018
            n = yield from session.precompute(cancel=cancel)
            return n

        def done(n):
            if self.session is not session:
                return
            self._remember_model()
            self._set_status(f"Embeddings ready ({n} slices encoded): prompts now only decode.")

        self._run(work, "Precomputing embeddings", on_return=done)
        return self.task

    # ================================================================== export / autosave
    def export(self, path=None, per_object_dir=None):
        """Write the label map (+ names and colour tables) on the source scan's grid.

        path: output .nii.gz/.nii/.nrrd/.mha; asks with a file dialog when None.
        per_object_dir: also write one file per object there (default: beside `path` when the
            "one file per object" box is ticked).
        """
        if not self._ready("export"):
            return None
        self._sync_paint()
        self._accept_pending()
        if not self.session.labels.array.any():
            _notify("warning", "There is nothing to export yet: segment an object (box, S, P) or paint one first.")
            return None
        if path is None:
            start = ""
            src = self.session.volume.source_path
            if src is not None:
                start = str(src.parent / "labels.nii.gz")
            path, _ = QFileDialog.getSaveFileName(self, "Export label map", start,
                                                  "Label maps (*.nii.gz *.nii *.nrrd *.mha)")
            if not path:
                return None
        path = Path(path)
        if not path.name.lower().endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
            path = path.with_name(path.name + ".nii.gz")
        if per_object_dir is None and self.per_object_check.isChecked():
            stem = path.name.split(".")[0]
            per_object_dir = path.parent / f"{stem}_objects"
        try:
            written = self.session.save(path, per_object_dir=per_object_dir)
        except Exception as exc:
            _notify("error", f"Export failed: {exc}")
            return None
        self._set_status(f"Saved {path} ({len(self.session.labels.objects)} objects"
                         f"{', one file each in ' + str(per_object_dir) if per_object_dir else ''}).")
        _notify("info", f"Label map saved to {path}.")
        return written

    def _state(self) -> dict:
        """The session's state (`SegmentationSession.to_state`) plus what only the panel holds: the current
        object, its prompts, and the slice result not accepted yet (so a kill loses no object in progress)."""
        self._store_prompts()
        state = dict(self.session.to_state(), format="medsam_plugin.autosave/2", current=self.current_label,
                     prompts={str(k): {"fg": v["fg"], "bg": v["bg"], "boxes": v["boxes"]}
                              for k, v in self.prompts.items()})
        if self.pending is not None:
            label_id, pred = self.pending
            state["pending"] = {"label_id": int(label_id), "z": int(pred.z), "iou": float(pred.iou),
                                "yx": np.argwhere(pred.mask_yx).tolist()}
        return state

    def _autosave(self) -> None:
        if not self.autosave_enabled or self.autosave_folder is None or self.session is None:
            return
        try:
            _autosave.save(self.autosave_folder, self.session.labels.array, self._state())
        except Exception as exc:  # autosave must never break the work itself
            log.warning("autosave failed: %s", exc)
            _notify("warning", f"Autosave to {self.autosave_folder} failed ({exc}); export your work "
                               "with 'Export label map' to be safe.")

    def restore_autosave(self) -> bool:
        """Bring back the autosaved labels, objects and prompts of this scan (undoable labels)."""
        if not self._ready("restore the autosave"):
            return False
        folder = getattr(self, "offered_folder", None) or self.autosave_folder
        if folder is None or not _autosave.exists(folder):
            _notify("info", "There is no autosave for this scan.")
            return False
        try:
            labels, state = _autosave.load(folder)
        except Exception as exc:
            _notify("error", f"The autosave in {self.autosave_folder} could not be read ({exc}); it was left as is.")
            return False
        if tuple(labels.shape) != tuple(self.session.shape_zyx):
            _notify("warning", "The autosave does not match this scan's size; it was not restored.")
            return False
        s = self.session
        self._drop_pending()
        s.from_state(labels, state)  # objects, voxels, seeds, stop slices, overlap rule, locks
        self._propagated = set(int(k) for k in state.get("propagated", []))
        self.prompts = {
            int(k): {"fg": np.asarray(v.get("fg", []), dtype=np.float64).reshape(-1, 3),
                     "bg": np.asarray(v.get("bg", []), dtype=np.float64).reshape(-1, 3),
                     "boxes": [np.asarray(b, dtype=np.float64) for b in v.get("boxes", [])]}
            for k, v in state.get("prompts", {}).items()
        }
        current = state.get("current")
        self.current_label = None
        if current is not None and int(current) in s.labels.objects:
            self.select_object(int(current))
        elif s.labels.objects:
            self.select_object(sorted(s.labels.objects)[0])
        pend = state.get("pending")
        if pend and int(pend["label_id"]) in s.labels.objects:  # the slice result the kill interrupted
            from ..engine.predictor import SlicePrediction

            mask = np.zeros(s.shape_zyx[1:], dtype=bool)
            yx = np.asarray(pend.get("yx", []), dtype=np.int64).reshape(-1, 2)
            mask[yx[:, 0], yx[:, 1]] = True
            self.pending = (int(pend["label_id"]), SlicePrediction(
                z=int(pend["z"]), mask_yx=mask, logits_256=np.zeros((256, 256), np.float32), iou=float(pend.get("iou", 0))))
        self.set_overlap(s.overlap)
        self._refresh_objects()
        self._show_labels()
        self.restore_btn.setEnabled(False)
        self.restore_banner.setVisible(False)
        self.offered_folder = None
        seeds = sum(len(v) for v in s.seeds.values())
        self._set_status(f"Restored the autosave of {state.get('saved_at', 'earlier')} "
                         f"({len(s.labels.objects)} objects, {seeds} segmented slices"
                         f"{', and the slice result not yet accepted' if self.pending else ''}). P propagates on.")
        self._autosave()
        return True
