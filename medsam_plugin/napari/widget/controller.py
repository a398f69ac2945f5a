"""The controller: `MedSAMWidget`, the dock widget napari makes (napari.yaml), a thin adapter over the session.

It glues the panel (`panel.py`), the viewer's layers (`label_layers.py`, `prompt_layers.py`), the
key bindings (`keys.py`) and one `engine.session.SegmentationSession` per scan, runs long work in
the background (`runner.py`) and autosaves (`_autosave`). Its handlers are plain methods
that the buttons, the keys, the tests and scripts call alike. The workflow's rules (what prompts
mean, what a correction does, what painting may change, what to clear, review order, the state an
autosave keeps) are the session's; this module turns the user's gestures into session calls and
shows the result, with a sentence for each outcome.

Threading: model loading, slice encoding, propagation and precomputation run in napari
`thread_worker`s (inline with MEDSAM_PLUGIN_INLINE=1). While a task runs the Labels layer is
read-only, so the user's painting never races a propagation; painting is taken into the session
(`take_painting`, undoable) before any engine call.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

from ...io.formats import DEFAULT_LABEL_SUFFIX, LABEL_SUFFIXES, has_suffix
from .. import _autosave
from .._reader import META_SOURCE, META_VOLUME, layer_geometry
from .._tasks import Task
from .keys import KeyBindings
from .label_layers import LAYER_LABELS, LAYER_ORIENTATION, LAYER_OVERLAP_PREFIX, LAYER_PENDING, LabelLayers
from .panel import Panel
from .prompt_layers import PromptLayers
from .runner import TaskRunner
from .strip import render_confidence_strip

log = logging.getLogger(__name__)

REVIEW_HINT = "Propagate an object to see how sure each slice is."


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications

    {"info": notifications.show_info, "warning": notifications.show_warning,
     "error": notifications.show_error}[kind](message)


def slices_phrase(zs) -> str:
    """'slice 3' / 'slices 3–9 (7 slices)' / 'no slice' for the sorted slices a result holds."""
    zs = list(zs)
    if not zs:
        return "no slice"
    if len(zs) == 1:
        return f"slice {zs[0]} only"
    return f"slices {zs[0]}–{zs[-1]} ({len(zs)} slices)"


# What the status says when a background click the model ignored was carved out by the session
# (SegmentationSession._carve_background_click).
CARVED_NOTE = ("the model kept the spot the background click marked, so the part of the mask round the click "
               "with the click's intensity was cut out (Ctrl+Z undoes)")


class _VerticalScroll(QScrollArea):
    """Scrolls its widget up and down only: the dock is kept as wide as the widget needs, now and
    after rows appear (a width taken once at start-up left the panel 1 px wider than the dock)."""

    def __init__(self, widget: QWidget) -> None:
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setWidget(widget)

    def minimumSizeHint(self) -> QSize:
        inner = self.widget().minimumSizeHint()
        # napari's style sheet gives the area a frame even with NoFrame set
        extra = self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()
        return QSize(inner.width() + extra, super().minimumSizeHint().height())


class MedSAMWidget(QWidget):
    """Interactive MedSAM segmentation of the selected scan.

    Args:
        napari_viewer: the viewer (napari passes it).
        autosave_policy: what to do when an autosave of the opened scan exists: "ask" (offer it in
            the panel and enable "Restore autosave"), "restore" or "ignore". Default:
            $MEDSAM_PLUGIN_AUTOSAVE or "ask".
        inline: run long work in the GUI thread (tests, debugging); default $MEDSAM_PLUGIN_INLINE.
        embedding_cache: folder for on-disk slice embeddings (keyed by slice content + model), so
            reopening a scan does not re-encode it; default `<cache root>/embeddings`
            (see `_autosave.cache_root`); False keeps them in memory only.

    Attributes: `panel` (the Qt widgets), `session`, `image_layer`, `label_layers`,
    `prompt_layers`, `current_label` (the object prompts, segmenting and painting apply to).
    """

    def __init__(self, napari_viewer, autosave_policy: str | None = None, inline: bool | None = None,
                 embedding_cache=None):
        super().__init__()
        self.viewer = napari_viewer
        if embedding_cache is None:
            embedding_cache = _autosave.cache_root() / "embeddings"
        self.embedding_cache = Path(embedding_cache) if embedding_cache else None
        self.autosave_policy = autosave_policy or os.environ.get("MEDSAM_PLUGIN_AUTOSAVE", "ask")
        self.session = None
        self.image_layer = None
        self.label_layers: LabelLayers | None = None
        self.prompt_layers: PromptLayers | None = None
        self.current_label: int | None = None
        self.autosave_folder: Path | None = None
        self.offered_folder: Path | None = None  # a copy of the autosave offered for restoring
        self.autosave_enabled = True
        self.timings: dict[str, list[float]] = {"segment_s": [], "propagation_step_s": []}
        self._loaded_models: dict[tuple[str, str], object] = {}
        self._strip_data: tuple = ({}, (), 0)  # (confidence, seeds, n slices) of the current object
        self._fit_until = 0.0  # until then (time.monotonic), a canvas resize fits the scan again
        self._model_choice: tuple[str, str] = ("", "")  # the last (model, device) that passed the check
        self._removing_own_layers = False
        self.keys = KeyBindings(self)
        self.panel = Panel(self)
        self._model_choice = (self.model_name(), self.device_name())
        self.runner = TaskRunner(inline, on_busy=self._set_busy, on_progress=self.panel.show_progress,
                                 on_error=self._task_failed)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        # In a scroll area the panel keeps its rows' heights on a short screen (squeezed into the
        # dock, the buttons' captions were cut in half at 870 px of window height).
        self.scroll = _VerticalScroll(self.panel)
        layout.addWidget(self.scroll)
        # The status line stays in view under the scrolling panel: at the end of a panel taller than
        # the window, the answer to S (an unsure answer's advice included) was below the fold.
        self.panel.layout().removeWidget(self.panel.status)
        self.panel.status.setContentsMargins(6, 4, 6, 4)
        layout.addWidget(self.panel.status)
        self.viewer.layers.events.inserted.connect(self._refresh_scan_choices)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.dims.events.current_step.connect(self._on_slice_changed)
        self._canvas_size_event = getattr(getattr(getattr(self.viewer, "canvas", None), "events", None), "size", None)
        if self._canvas_size_event is not None:
            self._canvas_size_event.connect(self._on_canvas_resized)
        self._refresh_scan_choices()
        self.keys.bind(self.viewer)
        if self.session is None:
            candidates = [l for l in self._image_layers() if META_VOLUME in l.metadata]
            if candidates:
                self.start_session(candidates[-1])

    # ================================================================== the layers, for scripts and tests
    @property
    def labels_layer(self):
        return self.label_layers.labels if self.label_layers else None

    @property
    def pending_layer(self):
        return self.label_layers.pending if self.label_layers else None

    @property
    def box_layer(self):
        return self.prompt_layers.box if self.prompt_layers else None

    @property
    def fg_layer(self):
        return self.prompt_layers.fg if self.prompt_layers else None

    @property
    def bg_layer(self):
        return self.prompt_layers.bg if self.prompt_layers else None

    @property
    def pending(self):
        """The slice result shown but not accepted (label id, SlicePrediction), or None (`session.pending`)."""
        return self.session.pending if self.session is not None else None

    @property
    def reviewed(self) -> dict[int, set[int]]:
        """Per object, the propagated slices the review key has shown (`session.reviewed`)."""
        return self.session.reviewed if self.session is not None else {}

    def _set_status(self, text: str) -> None:
        self.panel.set_status(text)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.cancel()
        self.keys.unbind_all()
        for emitter, slot in ((self.viewer.layers.events.inserted, self._refresh_scan_choices),
                              (self.viewer.layers.events.removed, self._on_layer_removed),
                              (self.viewer.dims.events.current_step, self._on_slice_changed),
                              (self._canvas_size_event, self._on_canvas_resized)):
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
        combo = self.panel.scan_combo
        current = combo.currentText()
        combo.clear()
        names = [l.name for l in self._image_layers()]
        combo.addItems(names)
        if current in names:
            combo.setCurrentText(current)
        if self.session is None and event is not None:
            layer = getattr(event, "value", None)
            if layer is not None and META_VOLUME in getattr(layer, "metadata", {}):
                self.start_session(layer)

    def _on_layer_removed(self, event=None) -> None:
        self._refresh_scan_choices()
        layer = getattr(event, "value", None)
        if layer is None:
            return
        if layer is self.image_layer:
            self._close_scan()
        elif self.label_layers is not None:  # an object's overlap layer the user removed comes back when needed
            for label_id, own in list(self.label_layers.overlaps.items()):
                if own is layer:
                    del self.label_layers.overlaps[label_id]
            if not self._removing_own_layers and self._owns(layer):
                from qtpy.QtCore import QTimer

                # After the removal is over: the viewer may be clearing every layer (closing), and
                # then the scan goes too and nothing is put back.
                index = getattr(event, "index", None)
                QTimer.singleShot(0, lambda: self._put_back(layer, index))

    def _owns(self, layer) -> bool:
        own = [self.label_layers.labels, self.label_layers.pending, self.label_layers.orientation]
        if self.prompt_layers is not None:
            own += list(self.prompt_layers.layers)
        return any(layer is o for o in own)

    def _put_back(self, layer, index) -> None:
        """Re-insert one of the session's own layers that the user deleted by hand: the widget keeps
        writing results, prompts and paint into these layer objects, so without them every later
        S, P or export would act on layers nobody can see."""
        if self.label_layers is None or self.image_layer not in self.viewer.layers or not self._owns(layer) \
                or layer in self.viewer.layers:
            return
        at = len(self.viewer.layers) if index is None else min(int(index), len(self.viewer.layers))
        self.viewer.layers.insert(at, layer)
        text = (f"'{layer.name}' belongs to the MedSAM session of '{self.image_layer.name}' and was put back "
                f"(the work in it is kept). To close the session, remove the scan's layer.")
        self._set_status(text)
        _notify("info", text)

    def _close_scan(self) -> None:
        """The scan's image layer is gone: stop its work and take away everything shown of it.

        A running task is cancelled (its callbacks see the session gone and change nothing); the
        work done so far stays in the autosave, offered again when the scan is reopened.
        """
        self.cancel()
        if self.label_layers is not None:
            self.label_layers.close()
        saved = self.autosave_folder is not None and self.autosave_enabled and self.session is not None \
            and self.session.has_work
        self.session = None
        self.image_layer = None
        self.current_label = None
        self.label_layers = self.prompt_layers = None
        self.autosave_folder = self.offered_folder = None
        self._strip_data = ({}, (), 0)
        self._remove_plugin_layers()
        self.panel.set_active(False)
        self._fit_view()
        kept = " Its work is in the autosave: open it again to restore it." if saved else ""
        self._set_status(f"The scan was closed.{kept} Open a scan (or choose one and press 'Use this scan').")

    def _remove_plugin_layers(self) -> None:
        self._removing_own_layers = True  # the removal handler must not put these back
        try:
            for layer in list(self.viewer.layers):
                if self._is_plugin_layer(layer):
                    self.viewer.layers.remove(layer)
        finally:
            self._removing_own_layers = False

    @staticmethod
    def _is_plugin_layer(layer) -> bool:
        return layer.name in (LAYER_LABELS, LAYER_PENDING, LAYER_ORIENTATION, *PromptLayers.NAMES) \
            or layer.name.startswith(LAYER_OVERLAP_PREFIX)

    def _volume_of(self, layer):
        """The source Volume of an image layer (from the reader), or one built from its transform."""
        from ...io import Volume, guess_modality
        from ...io.orientation import SliceView

        vol = layer.metadata.get(META_VOLUME)
        if vol is not None:
            from .._reader import META_AXIS

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
        return Volume(data_ijk=data, affine_ras=affine, modality=guess_modality(data), modality_source="guess"), "axial"

    def start_session(self, layer=None) -> bool:
        """Start segmenting `layer` (default: the image chosen in the panel). Returns success."""
        from ...engine.session import SegmentationSession

        if self._busy():
            return False
        if layer is None:
            name = self.panel.scan_combo.currentText()
            if not name or name not in self.viewer.layers:
                _notify("warning", "No 3D image is open: open a CT or MRI scan first (File > Open), then press 'Use this scan'.")
                return False
            layer = self.viewer.layers[name]
        try:
            volume, axis = self._volume_of(layer)
            window_note = self._choose_window(layer, volume, axis)
            session = SegmentationSession(volume, model=self.model_name(), device=self.device_name(), axis=axis,
                                          window=self._window_for(volume.modality),
                                          loaded_model=self._loaded_models.get((self.model_name(), self.device_name())),
                                          cache_dir=self.embedding_cache)
        except Exception as exc:
            _notify("error", f"Could not start on '{layer.name}': {exc}")
            return False
        if tuple(session.shape_zyx) != tuple(layer.data.shape):
            _notify("error", f"The layer '{layer.name}' has shape {layer.data.shape}, but its scan's view is "
                             f"{session.shape_zyx}. Open the scan again with the MedSAM reader.")
            return False
        self.session = session
        self.image_layer = layer
        self.panel.scan_combo.setCurrentText(layer.name)
        self.current_label = None
        self._make_layers()
        self.panel.set_active(True)
        session.set_overlap(self.panel.overlap_mode())  # the panel's choice holds
        irregular = session.irregular_slices
        self.panel.volumes_approximate = irregular
        self._refresh_objects()
        self._set_status(f"Scan: {volume.describe()}.{window_note} Draw a box (or click points) on a slice, then press S.")
        if irregular:
            text = (f"'{layer.name}': {irregular}. Slice by slice the results are right, but volumes in mL are "
                    f"approximate, and a label map (NIfTI, NRRD, MHA) would carry the wrong spacing: export a "
                    f"DICOM SEG (.dcm) instead, or export the series again with every slice.")
            self._set_status(text)
            _notify("warning", text)
        self._find_autosave(layer, volume)
        return True

    def _choose_window(self, layer, volume, axis) -> str:
        """Show the window the scan opens in (`engine.preprocessing.choose_window`: lung for a lung CT,
        the MR percentiles for MR); returns the status line's sentence on it."""
        from ...engine.preprocessing import WINDOW_PRESETS, choose_window
        from ...io.orientation import SliceView
        from .._reader import META_WINDOW

        modality = str(volume.modality).upper()
        if modality != "CT":
            self.panel.show_window("mr")
            self.panel.set_modality(modality)
            return ""
        chosen = layer.metadata.get(META_WINDOW)
        if not chosen:
            chosen = choose_window(SliceView(volume, axis=axis).to_view(volume.data_ijk), "CT")
        name, why = chosen
        level, width = WINDOW_PRESETS[name]
        self.panel.set_modality("CT")
        self.panel.show_window(name, level, width)
        layer.contrast_limits = (level - width / 2.0, level + width / 2.0)
        return f" Window: {name} ({why}; change it under Intensity)."

    def _find_autosave(self, layer, volume) -> None:
        """Locate this scan's autosave folder, and restore or offer an autosave found there."""
        self.autosave_folder = None
        src = layer.metadata.get(META_SOURCE) or (str(volume.source_path) if volume.source_path else None)
        if src and Path(src).exists():
            try:
                self.autosave_folder = _autosave.autosave_dir(src)
            except OSError:
                self.autosave_folder = None
        self.panel.offer_restore(None)
        self.offered_folder = None
        if self.autosave_folder is None or not _autosave.exists(self.autosave_folder):
            return
        if self.autosave_policy == "restore":
            self.restore_autosave()
        elif self.autosave_policy == "ask":
            try:  # new work autosaves beside it, never over it, until the user restores it
                self.offered_folder = _autosave.keep_offered(self.autosave_folder)
            except OSError:
                self.offered_folder = self.autosave_folder
            when = ""
            try:
                when = " on " + _autosave.load(self.offered_folder)[1].get("saved_at", "")
            except Exception:
                pass
            text = (f"Earlier work on '{Path(src).name}' was autosaved{when}. Press 'Restore autosave' to "
                    "bring it back; it stays available while you work.")
            self.panel.offer_restore(text)
            _notify("info", text)

    def _make_layers(self) -> None:
        """Create (or reset) the label and prompt layers over the session's scan."""
        if self.label_layers is not None:
            self.label_layers.close()
        self._remove_plugin_layers()
        geometry = dict(layer_geometry(self.session.view))
        self.label_layers = LabelLayers(self.viewer, self.session, geometry, on_new_layer=self.keys.bind)
        self.prompt_layers = PromptLayers(self.viewer, geometry, self.session.shape_zyx)
        self.label_layers.labels.events.paint.connect(self._on_paint)
        for layer in (*self.label_layers.layers, *self.prompt_layers.layers, self.image_layer):
            self.keys.bind(layer)
        self.prompt_layers.activate_box_tool()
        # The slider names what it moves through (napari's default label is "-3").
        self.viewer.dims.axis_labels = ("slice", *self.viewer.dims.axis_labels[1:])
        from qtpy.QtCore import QTimer

        # Once the dock has taken its room, fit the scan into what is left of the canvas.
        self._fit_until = time.monotonic() + 1.5
        QTimer.singleShot(0, self._fit_view)

    def _fit_view(self) -> None:
        try:
            self.viewer.reset_view()
        except Exception:  # the viewer is closing
            pass

    def _on_canvas_resized(self, event=None) -> None:
        # While the dock settles (it takes its room after the scan is shown), keep the scan fitted.
        if time.monotonic() < self._fit_until:
            from qtpy.QtCore import QTimer

            QTimer.singleShot(0, self._fit_view)

    # ================================================================== settings
    def model_name(self) -> str:
        return self.panel.model_name()

    def device_name(self) -> str:
        return self.panel.device_name()

    def change_model(self) -> None:
        """Use the model/device now chosen; labels, objects, seeds, stop slices and undo history are kept
        (embeddings are not). The choice is checked at once (`model.registry.check_available`): weights
        that are not installed, a missing or damaged file, or a device not here are refused with a
        sentence, and the previous choice stays."""
        s = self.session
        chosen = (self.model_name(), self.device_name())
        if chosen == self._model_choice and (s is None or (s.model_name, s.device) == chosen):
            return
        if self._busy():
            _notify("warning", "The model can change once the running work ends (or press Cancel).")
            self.panel.show_model(*self._model_choice)
            return
        if not self._check_model(*chosen):
            return
        self._model_choice = chosen
        if s is None or (s.model_name, s.device) == chosen:
            return
        self._sync_paint()
        self._keeping_layers(s.accept_pending)  # a preview of the old model is kept as the user saw it
        s.set_model(self.model_name(), self.device_name(),
                    loaded_model=self._loaded_models.get((self.model_name(), self.device_name())))
        self._refresh_objects()
        self._set_status(f"Model {self.model_name()} on {self.device_name()}: it loads with the next segmentation.")

    def _check_model(self, name: str, device: str) -> bool:
        """Whether the model and device chosen can be used; if not, say why and show the last good choice."""
        from ...model.registry import check_available

        try:
            check_available(name, device=device)
        except Exception as exc:  # ModelLoadError / DeviceNotAvailableError: their sentence says what to do
            previous = self._model_choice
            self.panel.show_model(*previous)
            text = f"Model '{name}' on {device} cannot be used: {exc} Still using '{previous[0]}' on {previous[1]}."
            self._set_status(text)
            _notify("warning", text)
            return False
        return True

    def _window_for(self, modality: str = "CT"):
        """The window the panel asks for, as the session takes it: a preset name, (level, width) or "mr"."""
        choice = self.panel.window_choice()
        return "mr" if choice == "mr" or modality == "MR" else choice

    def set_window(self, choice: str, level: float | None = None, width: float | None = None) -> None:
        """Intensity preset (`engine.preprocessing.WINDOW_PRESETS`, "custom" or "mr") for display and model.

        Changing the window changes what the model sees, so cached slice embeddings are dropped.
        """
        from ...engine.preprocessing import parse_window

        self.panel.show_window(choice, level, width)
        if self.session is None or self._busy():
            return
        try:
            window = parse_window(self._window_for(self.session.modality))
            if window == self.session.window:
                return
            self.session.set_window(window)
        except Exception as exc:
            _notify("error", f"Could not apply the intensity window: {exc}")
            return
        if window != "mr" and self.image_layer is not None:
            lv, wd = window
            self.image_layer.contrast_limits = (lv - wd / 2.0, lv + wd / 2.0)

    # ================================================================== objects
    def _refresh_objects(self) -> None:
        """Rebuild the list, the layers' colours and the writer metadata, and the history buttons."""
        if self.session is None:
            return
        s = self.session
        hidden = self.label_layers.hidden if self.label_layers else set()
        volumes, previews = s.volumes_ml(), s.pending_volume_ml()
        rows = [(k, o.name, o.color, volumes[k], k in s.locked, k in hidden, previews.get(k))
                for k, o in sorted(s.labels.objects.items())]
        self.panel.show_objects(rows, self.current_label)
        if self.label_layers is not None:
            self.label_layers.set_colors(self.current_label, self.model_name())
        self._refresh_history()
        self._refresh_review()

    def _refresh_history(self) -> None:
        s = self.session
        self.panel.show_history(s is not None and s.can_undo, s is not None and s.can_redo)

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
        if self.session is None or label_id not in self.session.labels.objects:
            return
        try:
            self.session.rename(label_id, name)
        except ValueError as exc:  # an empty name
            self._set_status(str(exc))
        self._refresh_objects()
        self._show_labels()  # an overlap layer carries its object's name
        self._autosave()

    def voxel_ml(self) -> float:
        """The volume of one voxel in millilitres."""
        return self.session.voxel_ml

    def object_volume_ml(self, label_id: int) -> float:
        return self.session.volume_ml(label_id)

    @property
    def hidden(self) -> set[int]:
        """Objects not shown (`LabelLayers.hidden`)."""
        return self.label_layers.hidden if self.label_layers else set()

    def set_object_visible(self, label_id: int, visible: bool) -> None:
        """Show or hide one object in the layers (its voxels stay; export is unchanged)."""
        if self.label_layers is not None:
            (self.label_layers.hidden.discard if visible else self.label_layers.hidden.add)(int(label_id))
        self._refresh_objects()

    def toggle_lock(self, label_id: int | None = None, locked: bool | None = None) -> None:
        """Lock an object (nothing may change it) or unlock it (`SegmentationSession.set_locked`)."""
        if self.session is None:
            return
        label_id = self.current_label if label_id is None else int(label_id)
        if label_id not in self.session.labels.objects:
            return
        locked = self.session.set_locked(label_id, locked)
        self._refresh_objects()
        self._autosave()
        name = self.session.labels.objects[label_id].name
        self._set_status(f"'{name}' is locked: nothing changes it until you unlock it." if locked
                         else f"'{name}' is unlocked.")

    def set_object_color(self, label_id: int, rgb) -> None:
        if self.session is None or label_id not in self.session.labels.objects:
            return
        self.session.set_color(label_id, rgb)
        self._refresh_objects()
        self._autosave()

    def color_clicked(self) -> None:
        from qtpy.QtGui import QColor
        from qtpy.QtWidgets import QColorDialog

        if self.session is None or self.current_label is None:
            return
        old = self.session.labels.objects[self.current_label].color
        color = QColorDialog.getColor(QColor(*old[:3]), self, "Object colour")
        if color.isValid():
            self.set_object_color(self.current_label, (color.red(), color.green(), color.blue()))

    def rename_clicked(self) -> None:
        from qtpy.QtWidgets import QInputDialog

        if self.current_label is None or self.session is None:
            return
        old = self.session.labels.objects[self.current_label].name
        name, ok = QInputDialog.getText(self, "Rename object", "Name:", text=old)
        if ok:
            self.rename_object(self.current_label, name)

    def object_item_edited(self, label_id: int, name: str, visible: bool) -> None:
        """The object list changed: a tick box (shown or hidden) or a name typed in."""
        if self.session is None or label_id not in self.session.labels.objects:
            return
        if visible == (label_id in self.hidden):  # the tick box changed
            self.set_object_visible(label_id, visible)
        elif name != self.session.labels.objects[label_id].name:
            self.rename_object(label_id, name)

    def set_overlap(self, mode: str) -> None:
        """The overlap rule for new results: "none", "all" or "allow" (see panel.OVERLAP_CHOICES)."""
        if self.session is None:
            return
        self.session.set_overlap(mode)
        self.panel.show_overlap(mode)
        self._show_labels()
        self._refresh_objects()
        self._autosave()

    def delete_object(self, label_id: int | None = None) -> None:
        """Remove an object and its voxels (the voxel removal is undoable)."""
        if not self._ready("delete an object"):
            return
        label_id = self.current_label if label_id is None else label_id
        if label_id is None or label_id not in self.session.labels.objects:
            return
        self._sync_paint()
        self.session.remove_object(label_id)  # its prompts, review marks and preview go too
        if self.current_label == label_id:
            self.current_label = None
            self.prompt_layers.load({})
            remaining = sorted(self.session.labels.objects)
            if remaining:
                self.select_object(remaining[0])
        self._show_labels()
        self._refresh_objects()
        self._autosave()

    def select_object(self, label_id: int) -> None:
        """Make `label_id` the object that prompts, segmenting and painting apply to."""
        s = self.session
        if s is None or label_id not in s.labels.objects:
            return
        if label_id != self.current_label:
            first = self.current_label is None  # prompts drawn before any object belong to this one
            self._store_prompts()
            if s.drop_pending():  # another object's preview goes with the choice of another object
                self._show_labels()
            self.current_label = label_id
            if not first or label_id in s.prompts:
                self.prompt_layers.load(s.prompts_of(label_id))
        self._refresh_objects()

    def _ensure_object(self) -> int:
        if self.current_label is None or self.current_label not in self.session.labels.objects:
            existing = sorted(self.session.labels.objects)
            if existing:
                self.select_object(existing[0])
            else:
                self.add_object()
        return self.current_label

    def _refuse_locked(self, label_id) -> bool:
        if self.session is not None and label_id in self.session.locked:
            _notify("warning", f"'{self.session.labels.objects[label_id].name}' is locked: unlock it (Lock) to change it.")
            return True
        return False

    # ================================================================== prompts
    def _store_prompts(self) -> None:
        """Keep the prompt layers' content as the current object's prompts (`session.store_prompts`)."""
        s = self.session
        if s is not None and self.prompt_layers is not None and self.current_label in s.labels.objects:
            s.store_prompts(self.current_label, **self.prompt_layers.data())

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

    def add_box(self, box_xyxy, z: int | None = None) -> None:
        """Add a box prompt (x0, y0, x1, y1 slice pixels) on slice z (default: the current one)."""
        self.prompt_layers.add_box(box_xyxy, self.current_z() if z is None else int(z))

    def add_point(self, yx, positive: bool = True, z: int | None = None) -> None:
        """Add a foreground (positive) or background point (row, col) on slice z."""
        self.prompt_layers.add_point(yx, positive, self.current_z() if z is None else int(z))

    def activate_box_tool(self) -> None:
        if self.prompt_layers is not None:
            self.prompt_layers.activate_box_tool()

    def activate_point_tool(self, positive: bool = True) -> None:
        if self.prompt_layers is not None:
            self.prompt_layers.activate_point_tool(positive)

    def clear_prompts_on_slice(self, z: int | None = None) -> None:
        if self.prompt_layers is not None:
            self.prompt_layers.clear_slice(self.current_z() if z is None else z)

    # ================================================================== labels display and painting
    def _show_labels(self) -> None:
        if self.label_layers is not None and self.session is not None:
            self.label_layers.show()
            self._refresh_history()

    def _keeping_layers(self, call, *args, **kwargs):
        """Call a session method that may accept the held slice result, and show that slice as the session
        now holds it (or the next paint sync would take the difference for painting)."""
        held = self.session.pending
        out = call(*args, **kwargs)
        if held is not None and self.session.pending is not held and self.label_layers is not None:
            self.label_layers.show_slice(held[1].z)
        return out

    def pending_layer_shows(self) -> bool:
        """Whether anything not accepted is on screen."""
        return self.label_layers is not None and self.label_layers.pending_shows()

    def _on_paint(self, event=None) -> None:
        # napari emits `paint` as a stroke's history is recorded: sync on the next event-loop turn.
        if self.label_layers is None or self.label_layers.updating or self.session is None or self._busy():
            return
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, self._paint_finished)

    def _paint_finished(self) -> None:
        if self.label_layers is None or self.label_layers.updating or self.session is None or self._busy():
            return
        if self._sync_paint():
            self._autosave()

    def _sync_paint(self) -> int:
        """Take the user's painting in the Labels layer into the session (undoable); returns voxels changed."""
        s = self.session
        if s is None or self.label_layers is None:
            return 0
        held = s.pending
        changed, refused = s.take_painting(self.label_layers.painted())
        if refused:
            _notify("warning", "Painting does not change a locked object: unlock it first (Lock).")
            self.label_layers.show()  # its voxels back as they were
        elif held is not None and s.pending is None:
            self.label_layers.show_slice(held[1].z)  # painting accepted the preview under the strokes
        if changed or refused:
            self._refresh_objects()
        if changed and (s.overlapping_objects() or self.label_layers.overlaps):
            self.label_layers.show()  # an object's own overlap layer follows its painted voxels
        return changed

    # ================================================================== background work
    @property
    def task(self) -> Task | None:
        """The last long task started (`TaskRunner.task`)."""
        return self.runner.task

    def _busy(self) -> bool:
        return self.runner.busy

    def _ready(self, what: str) -> bool:
        if self.session is None:
            _notify("warning", f"To {what}, open a CT or MRI scan first (File > Open, or File > Open Sample > "
                               "MedSAM > Abdominal CT) and choose it in the MedSAM panel.")
            return False
        if self._busy():
            _notify("warning", f"'{self.task.description}' is still running: wait for it to finish or press Cancel.")
            return False
        return True

    def _run(self, make_gen, description, on_yield=None, on_return=None, on_finish=None) -> Task:
        return self.runner.run(make_gen, description, on_yield=on_yield, on_return=on_return, on_finish=on_finish)

    def _task_failed(self, description: str, exc: BaseException) -> None:
        self._set_status(f"{description} failed: {exc}")  # not a stale "…ing" line
        _notify("error", f"{description} failed: {exc}")

    def _set_busy(self, busy: bool, description: str = "") -> None:
        self.panel.set_busy(busy, description)
        if self.label_layers is not None:
            self.label_layers.set_editable(not busy)
        if not busy:
            self._refresh_history()

    def wait(self, timeout_s: float = 120.0) -> bool:
        """Block (processing Qt events) until the running task ends; True when it ended."""
        return self.runner.wait(timeout_s)

    def cancel(self) -> None:
        """Stop the running task at its next step; a cancelled propagation changes nothing."""
        description = self.runner.cancel()
        if description is not None:
            self._set_status(f"Cancelling '{description}'…")

    def use_loaded_model(self, loaded) -> None:
        """Use an already loaded model (`model.registry.LoadedModel`) for the current model/device choice."""
        self._loaded_models[(self.model_name(), self.device_name())] = loaded
        s = self.session
        if s is not None and not s.model_loaded and self.image_layer is not None and not s.has_work:
            self.start_session(self.image_layer)  # nothing done yet: restart with the model

    def _remember_model(self) -> None:
        predictor = getattr(self.session, "_predictor", None)
        loaded = getattr(predictor, "loaded", None)
        if loaded is not None:
            self._loaded_models[(self.model_name(), self.device_name())] = loaded

    @staticmethod
    def _load_model_first(session, steps: int):
        """Progress for loading the model (in the worker thread), when it is not loaded yet.

        With the session's `prepare` (the engine's hook), its reports pass through as they are: a slow
        one-time step (the fast encoder's conversion) says so, with an estimate, in the panel.
        """
        from ...engine.propagation import Progress

        prepare = getattr(session, "prepare", None)
        if prepare is not None:
            yield from prepare()
            return
        if not session.model_loaded:
            yield Progress(0, steps, f"loading model {session.model_name}")
            session.predictor  # noqa: B018 (loads the model in this thread)

    # ================================================================== segment one slice
    def segment_slice(self):
        """Segment the current object on the current slice from the prompts on that slice.

        With a box: box (+ points). With points only on a slice the object already covers: a
        correction (`SegmentationSession.prepare_prompt`), accepted and re-propagated when the
        "Re-propagate after a correction" box is ticked.
        """
        if not self._ready("segment a slice"):
            return None
        t0 = time.perf_counter()
        self._sync_paint()
        z = self.current_z()
        points_yx, point_labels, box, box_note = self.prompt_layers.on_slice(z)
        if points_yx is None and box is None:
            _notify("warning", f"Slice {z} has no prompt: draw a box around the structure (Box tool) or click "
                               "inside it (+ Point tool), then press S.")
            return None
        if box_note == "tiny":
            self.prompt_layers.drop_tiny_boxes(z)
            text = ("The box tool needs a drag: press on one corner of the structure, hold and drag to the "
                    "opposite corner, then press S (for a click prompt, use + Point).")
            self._set_status(text)
            _notify("warning", text)
            return None
        if box_note == "outside":
            _notify("warning", f"The box on slice {z} lies (almost) outside the image: draw it around the "
                               "structure inside the scan, then press S.")
            return None
        label_id = self._ensure_object()  # only now: a refused S must not leave an empty object behind
        if self._refuse_locked(label_id):
            return None
        session = self.session
        correction = self._keeping_layers(session.prepare_prompt, label_id, z, box)
        if box is None and not session.reads_points:
            _notify("warning", f"The model '{self.model_name()}' was trained with boxes only and does not answer "
                               "clicks reliably: draw a box around the structure, or choose the model "
                               "'medsam_interactive', which is trained for clicks and corrections.")

        def work(cancel):
            from ...engine.propagation import Progress

            yield from self._load_model_first(session, 2)
            if not session.predictor.has_embedding(z):
                yield Progress(1, 2, f"encoding slice {z}")
            return session.segment_slice(label_id, z, points_yx=points_yx, point_labels=point_labels, box_xyxy=box,
                                         use_current_mask=correction, commit=False)

        def done(pred):
            if self.session is not session or label_id not in session.labels.objects:  # closed or deleted meanwhile
                return
            self._remember_model()
            self._keeping_layers(session.hold_pending, label_id, pred)  # a preview elsewhere is kept
            self.label_layers.show_pending_slice(z, label_id, pred.mask_yx, only=True)
            self._refresh_objects()  # the list measures the preview too
            self._autosave()  # the object in progress survives a crash
            dt = time.perf_counter() - t0
            self.timings["segment_s"].append(dt)
            what = "corrected" if correction else "segmented"
            clipped = " (the box was clipped to the image)" if box_note == "clipped" else ""
            if (pred.prompt or {}).get("carved"):
                clipped += f" ({CARVED_NOTE})"
            from ...engine.advice import weak_answer_note

            unsure = weak_answer_note(pred.iou, had_box=box is not None)
            self._set_status(f"Slice {z} {what}{clipped} ({int(pred.mask_yx.sum())} px, predicted IoU {pred.iou:.2f}, "
                             f"{dt * 1000:.0f} ms). " + (unsure or "A accepts, P propagates, more clicks refine."))
            if correction and session.was_propagated(label_id) and self.panel.repropagate_check.isChecked():
                session.drop_pending()  # `correct` takes it as the correction's seed
                from qtpy.QtCore import QTimer

                # Only the neighbours the correction really changes are redone; one undo step for all.
                QTimer.singleShot(0, lambda: self.propagate("both", from_slice=z, correction=pred))

        self._run(work, f"Segmenting slice {z}", on_return=done)
        return self.task

    def _commit_note(self, label_id) -> str:
        """The session's sentence on what the overlap rule kept from the object's last commit (a warning
        too when it kept everything), or ""."""
        s = self.session
        if label_id is None or label_id not in s.labels.objects:
            return ""
        note = s.commit_note(label_id)
        if note and not s.object_mask(label_id).any():
            _notify("warning", note)
        return note + " " if note else ""

    def accept(self) -> None:
        """Accept the shown slice result: it becomes a seed of the object and is autosaved."""
        if not self._ready("accept a result"):
            return
        self._sync_paint()
        label_id = self._keeping_layers(self.session.accept_pending)
        if label_id is not None:
            self._show_labels()
            self._refresh_objects()
            self._autosave()
            self._set_status(f"Accepted. {self._commit_note(label_id)}Propagate with P (both), U (up) or D (down).")
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
        s = self.session
        if s.pending is None and correction is None and (self.current_label is None or not s.seeds.get(self.current_label)):
            # nothing to work on: say so, and do not create an empty object
            _notify("warning", "This object has no segmented slice yet: box it on one slice, press S, then propagate.")
            return None
        label_id = self._ensure_object()
        if self._refuse_locked(label_id):
            return None
        self._keeping_layers(s.accept_pending)
        if correction is None and not s.seeds.get(label_id):
            _notify("warning", "This object has no segmented slice yet: box it on one slice, press S, then propagate.")
            return None
        session = s
        self._show_labels()
        state = {"last": None, "result": None, "task": None}

        def work(cancel):
            yield from self._load_model_first(session, 1)
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
            self.label_layers.show_pending_slice(progress.z, label_id, progress.prediction.mask_yx)
            state["last"] = time.perf_counter()

        def done(result):
            if self.session is not session:
                return
            self._remember_model()
            self._show_labels()
            self._refresh_objects()
            self._autosave()
            carved = ""
            if correction is not None and (correction.prompt or {}).get("carved"):
                carved = f"Slice {correction.z} corrected: {CARVED_NOTE}. "
            if result is None:  # a correction on an object the session had not propagated: the slice only
                self._set_status((carved or f"Slice {correction.z} corrected. ") + "Propagate with P.")
                return
            why = "; ".join(f"{k}: {v}" for k, v in result.stopped.items())
            self._set_status(f"{carved}Propagated to {slices_phrase(result.slices)}. {why}. "
                             f"{self._commit_note(label_id)}Click points on a slice to correct it (S), or paint.")

        def finish(cancelled):
            if self.session is not session:
                return
            if cancelled and state["result"] is not None:
                # The run had committed before the cancel reached it: say so, and keep it undoable.
                done(state["result"])
                self._set_status(self.panel.status.text() + " (Cancel came after the last slice; Ctrl+Z takes it back.)")
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
        self._keeping_layers(self.session.accept_pending)
        z = self.current_z()
        self.session.stop_here(label_id, z)  # also records z as the object's stop slice
        self._show_labels()
        self._refresh_objects()
        self._autosave()
        self._set_status(f"Object stops at slice {z}: later propagations will not enter it.")

    # ================================================================== review
    def _refresh_review(self) -> None:
        """Recompute the current object's confidence along z and redraw the strip."""
        s, label_id = self.session, self.current_label
        text = REVIEW_HINT
        if s is None or label_id is None or label_id not in s.labels.objects:
            self._strip_data = ({}, (), s.shape_zyx[0] if s else 0)
        else:
            conf = s.confidence_of(label_id)
            seeds = tuple(s.seeds.get(label_id, {}))
            self._strip_data = (conf, seeds, s.shape_zyx[0])
            if conf and len(conf) > len(seeds):
                todo = s.to_review(label_id, conf)
                low = min(c for z, c in conf.items() if z not in seeds)
                text = f"{len(todo)} propagated slices not reviewed; lowest confidence {low:.2f}."
        self.panel.review_label.setText(text)
        self._draw_strip()

    def _draw_strip(self) -> None:
        conf, seeds, n = self._strip_data
        current = self.current_z() if self.session is not None and self.image_layer is not None else None
        self.panel.confidence_strip.show_image(render_confidence_strip(
            conf, n, seeds=seeds, reviewed=self.reviewed.get(self.current_label, ()), current=current), n)

    def _on_slice_changed(self, event=None) -> None:
        if self.session is not None and self.image_layer is not None:
            self._draw_strip()  # only the current-slice frame moves: no recomputation

    def strip_clicked(self, z: int) -> None:
        if self.session is not None and self.image_layer is not None:
            self.set_slice(z)

    def review_next(self) -> int | None:
        """Show the current object's least confident propagated slice not yet reviewed, and mark it reviewed
        (`SegmentationSession.next_to_review`). Returns the slice, or None when none is left."""
        if not self._ready("review slices"):
            return None
        self._sync_paint()  # what the object holds now decides which slices are left to review
        s, label_id = self.session, self.current_label
        z = s.next_to_review(label_id) if label_id in s.labels.objects else None
        if z is None:
            self._set_status("Every propagated slice of this object has been reviewed."
                             if label_id is not None and s.was_propagated(label_id) else
                             "Propagate the object first (P); then G shows its least confident slices one by one.")
            return None
        self.set_slice(z)
        left = len(s.to_review(label_id))
        sig = s.signals.get(label_id, {}).get(z)
        why = ""
        if sig is not None:
            why = (f" (predicted IoU {sig.predicted_iou:.2f}, overlap with the neighbour {sig.iou_previous:.2f}, "
                   f"stability {sig.stability:.2f}"
                   + (f", intensity {sig.intensity_shift:.1f} seed stds off" if sig.intensity_shift is not None else "")
                   + ")")
        self._set_status(f"Slice {z}: confidence {s.confidence_of(label_id)[z]:.2f}{why}; {left} more to review. "
                         "Correct it with clicks (S), stop the object here (X), or press G for the next.")
        self._refresh_review()  # the review marks reach the autosave with the next change
        return z

    # ================================================================== history
    def undo(self) -> None:
        """Undo the last change (a slice result not accepted first, then the session's history)."""
        if not self._ready("undo"):
            return
        self._sync_paint()
        what = self.session.undo()  # seeds, brush edits and overlaps travel with the history
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
        self._refresh_objects()
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
        self.session.clear_object(label_id)  # also its stop slices, prompts, review marks and preview
        self.prompt_layers.load({})
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
            yield from self._load_model_first(session, 1)
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
            "one file per object" box is ticked). Under "allow overlap" with objects that overlap,
            those files are always written, as their own layers show them.
        """
        if not self._ready("export"):
            return None
        self._sync_paint()
        s = self.session
        self._keeping_layers(s.accept_pending)
        if not s.labels.array.any():
            _notify("warning", "There is nothing to export yet: segment an object (box, S, P) or paint one first.")
            return None
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            src = s.volume.source_path
            start = str(src.parent / f"labels{DEFAULT_LABEL_SUFFIX}") if src is not None else ""
            patterns = " ".join(f"*{x}" for x in LABEL_SUFFIXES)
            path, _ = QFileDialog.getSaveFileName(self, "Export label map", start, f"Label maps ({patterns})")
            if not path:
                return None
        path = Path(path)
        if not has_suffix(path, LABEL_SUFFIXES):
            path = path.with_name(path.name + DEFAULT_LABEL_SUFFIX)
        if per_object_dir is None and (self.panel.per_object_check.isChecked() or s.overlapping_objects()):
            per_object_dir = s.default_per_object_dir(path)
        try:
            written = s.save(path, per_object_dir=per_object_dir)
        except Exception as exc:
            _notify("error", f"Export failed: {exc}")
            return None
        self._set_status(f"Saved {path} ({len(s.labels.objects)} objects"
                         f"{', one file each in ' + str(per_object_dir) if per_object_dir else ''}).")
        _notify("info", f"Label map saved to {path}.")
        return written

    def _state(self) -> dict:
        """What the autosave keeps: `SegmentationSession.to_state`, with the current object and its prompts."""
        self._store_prompts()
        return self.session.to_state(current=self.current_label)

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
        """Bring back the autosaved work on this scan (`SegmentationSession.from_state`; undoable labels)."""
        if not self._ready("restore the autosave"):
            return False
        folder = self.offered_folder or self.autosave_folder
        if folder is None or not _autosave.exists(folder):
            _notify("info", "There is no autosave for this scan.")
            return False
        try:
            labels, state = _autosave.load(folder)
        except Exception as exc:
            _notify("error", f"The autosave in {folder} could not be read ({exc}); it was left as is.")
            return False
        s = self.session
        if tuple(labels.shape) != tuple(s.shape_zyx):
            _notify("warning", "The autosave does not match this scan's size; it was not restored.")
            return False
        s.drop_pending()
        # objects, voxels, seeds, stop slices, overlap rule and overlaps, locks, brush edits, prompts,
        # review marks and the slice result a crash interrupted
        current = s.from_state(labels, state)
        self.current_label = current
        if current is not None and current in s.prompts:
            self.prompt_layers.load(s.prompts_of(current))
        self.panel.show_overlap(s.overlap)
        self._show_labels()
        self._refresh_objects()
        self.panel.offer_restore(None)
        self.offered_folder = None
        seeds = sum(len(v) for v in s.seeds.values())
        self._set_status(f"Restored the autosave of {state.get('saved_at', 'earlier')} "
                         f"({len(s.labels.objects)} objects, {seeds} segmented slices"
                         f"{', and the slice result not yet accepted' if s.pending else ''}). P propagates on.")
        self._autosave()
        return True

    # ================================================================== the Dataset panel's access (napari/dataset_widget.py)
    def work_state(self, accept_pending: bool = True) -> dict | None:
        """The session's work as `SegmentationSession.to_state` keeps it, brush strokes and the prompts
        drawn included; `accept_pending`: the slice result not yet accepted is accepted first, as the
        user saw it (else the state carries it as pending). None without a session."""
        if self.session is None:
            return None
        self._sync_paint()
        if accept_pending:
            self._keeping_layers(self.session.accept_pending)
        return self._state()

    def load_work(self, labels_zyx, state: dict) -> None:
        """Show saved work (a dataset case's labels, view frame, and its session state) on the session."""
        s = self.session
        s.drop_pending()
        current = s.from_state(labels_zyx, state, what="open the saved case")
        self.current_label = current
        if self.prompt_layers is not None:
            self.prompt_layers.load(s.prompts_of(current))
        self.panel.show_overlap(s.overlap)
        self._show_labels()
        self._refresh_objects()
