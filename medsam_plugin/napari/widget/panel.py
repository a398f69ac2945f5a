"""The dock panel: its Qt widgets and layout, and how they show what the controller tells them.

Sections, top to bottom: scan and model (image, model, device, intensity window), objects (list
with volume, add / rename / colour / lock / delete, overlap rule), prompts on the current slice,
segment (the actions, progress bar and Cancel), review (the confidence strip, `strip.py`), save
(export, restore autosave, the restore offer), and the status line. Every button and signal calls
a method of the controller (`MedSAMWidget`); nothing here decides anything about the work.
"""

from __future__ import annotations

import time

from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ...engine.preprocessing import MR_PERCENTILES, WINDOW_PRESETS
from ...model.defaults import DEFAULT_MODEL
from .keys import shortcuts_text
from .strip import ConfidenceStrip

DEVICES = ("auto", "cpu", "cuda", "mps")
# the CT presets of the engine (level, width in HU), then a custom window, then MR percentiles
WINDOW_CHOICES = (*WINDOW_PRESETS, "custom", "mr")
# overlap rule shown -> SegmentationSession.overlap (3D Slicer's Segment Editor choices)
OVERLAP_CHOICES = {"overwrite none": "none", "overwrite all": "all", "allow overlap": "allow"}
VOLUME_SUFFIX = "  —  "  # between an object's name and its volume in the list


def model_choices() -> tuple[str, ...]:
    """The registered models, the default first (`model.registry.list_models`)."""
    try:
        from ...model.registry import list_models

        names = [spec.name for spec in list_models()]
    except Exception:  # pragma: no cover - torch missing: the panel still opens, loading says why
        names = []
    return tuple(dict.fromkeys([DEFAULT_MODEL, *names]))


def swatch(rgb) -> QIcon:
    pix = QPixmap(14, 14)
    pix.fill(QColor(*[int(c) for c in rgb[:3]]))
    return QIcon(pix)


def _elide_long_names(combo) -> None:
    """A long scan or checkpoint name must not widen the dock past the screen: the box keeps a
    fixed width (the full name is in its tooltip and its list)."""
    combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(16)
    combo.currentTextChanged.connect(combo.setToolTip)


class Panel(QWidget):
    """The panel's widgets; `controller` receives every click and edit."""

    def __init__(self, controller, parent=None):
        super().__init__(parent)
        self.controller = controller
        self._history = (False, False)  # (can undo, can redo), applied whenever the panel is not busy
        self._busy = False
        self._active = False  # a scan is open in a session: the actions have something to act on
        self.volumes_approximate = ""  # why the scan's mL are approximate (an unevenly spaced DICOM series)
        self._countdown: tuple[str, float] | None = None  # (message, expected end) of a slow one-time step
        self._countdown_timer = None
        c = controller
        root = QVBoxLayout(self)

        # ------------------------------------------------------------ scan and model
        scan = QGroupBox("Scan and model")
        form = QFormLayout(scan)
        self.scan_combo = QComboBox()
        _elide_long_names(self.scan_combo)
        self.start_btn = QPushButton("Use this scan")
        self.start_btn.clicked.connect(lambda: c.start_session())
        row = QHBoxLayout()
        row.addWidget(self.scan_combo, 1)
        row.addWidget(self.start_btn)
        form.addRow("Image", row)
        self.model_combo = QComboBox()
        _elide_long_names(self.model_combo)
        self.model_combo.setEditable(True)
        self.model_combo.addItems(model_choices())
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
        self.model_combo.activated.connect(lambda *_: c.change_model())
        self.model_combo.lineEdit().editingFinished.connect(c.change_model)
        self.device_combo.currentTextChanged.connect(lambda *_: c.change_model())
        form.addRow("Device", self.device_combo)
        self.window_combo = QComboBox()
        self.window_combo.addItems(WINDOW_CHOICES)
        self.level_spin = QDoubleSpinBox()
        self.width_spin = QDoubleSpinBox()
        level, width = WINDOW_PRESETS[WINDOW_CHOICES[0]]
        for spin, value in ((self.level_spin, level), (self.width_spin, width)):
            spin.setRange(-4000.0, 6000.0)
            spin.setValue(value)
            spin.setEnabled(False)
            spin.setDecimals(0)  # Hounsfield units are whole numbers
            spin.setSuffix(" HU")
        self.width_spin.setMinimum(1.0)
        self.window_combo.currentTextChanged.connect(self._on_window_choice)
        self.level_spin.editingFinished.connect(lambda: c.set_window("custom"))
        self.width_spin.editingFinished.connect(lambda: c.set_window("custom"))
        form.addRow("Intensity", self.window_combo)
        # Level and width on a row of their own, so the dock's default width shows them whole; an MR
        # scan shows what it is scaled by instead (its percentiles: no HU values apply).
        self.ct_fields = QWidget()
        row = QHBoxLayout(self.ct_fields)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("level"))
        row.addWidget(self.level_spin, 1)
        row.addWidget(QLabel("width"))
        row.addWidget(self.width_spin, 1)
        self.mr_note = QLabel(f"MR: each scan scaled by its {MR_PERCENTILES[0]:g}–{MR_PERCENTILES[1]:g} "
                              "percentiles of non-zero voxels")
        self.mr_note.setWordWrap(True)
        self.mr_note.setVisible(False)
        fields = QVBoxLayout()
        fields.setContentsMargins(0, 0, 0, 0)
        fields.addWidget(self.ct_fields)
        fields.addWidget(self.mr_note)
        form.addRow("", fields)
        root.addWidget(scan)

        # ------------------------------------------------------------ objects
        objects = QGroupBox("Objects")
        lay = QVBoxLayout(objects)
        self.object_list = QListWidget()
        self.object_list.setMaximumHeight(120)
        self.object_list.currentItemChanged.connect(self._on_object_item)
        self.object_list.itemChanged.connect(self._on_object_edited)
        self.object_list.setToolTip("Tick: shown. Double-click: rename. The volume is each object's own voxels.")
        lay.addWidget(self.object_list)
        row = QHBoxLayout()
        for text, slot in (("Add [N]", lambda: c.add_object()), ("Rename", c.rename_clicked),
                           ("Colour…", c.color_clicked), ("Lock", lambda: c.toggle_lock()),
                           ("Delete", lambda: c.delete_object())):
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
        self.overlap_combo.currentTextChanged.connect(lambda text: c.set_overlap(OVERLAP_CHOICES[text]))
        row.addWidget(QLabel("Overlap"))
        row.addWidget(self.overlap_combo, 1)
        lay.addLayout(row)
        root.addWidget(objects)

        # ------------------------------------------------------------ prompts
        prompts = QGroupBox("Prompts on the current slice")
        row = QHBoxLayout(prompts)
        for text, slot, tip in (
            ("Box", c.activate_box_tool, "Draw a box around the structure (rectangle tool)"),
            ("+ Point", lambda: c.activate_point_tool(True), "Click inside the structure"),
            ("- Point", lambda: c.activate_point_tool(False), "Click on what must be excluded"),
            ("Clear prompts", lambda: c.clear_prompts_on_slice(), "Remove the prompts of this slice"),
        ):
            b = QPushButton(text)
            b.setToolTip(tip)
            b.clicked.connect(slot)
            row.addWidget(b)
        root.addWidget(prompts)

        # ------------------------------------------------------------ segment
        actions = QGroupBox("Segment")
        grid = QGridLayout(actions)
        self.buttons: dict[str, QPushButton] = {}
        specs = [
            ("segment", "Segment slice [S]", c.segment_slice, 0, 0),
            ("accept", "Accept [A]", c.accept, 0, 1),
            ("both", "Propagate ↕ [P]", lambda: c.propagate("both"), 1, 0),
            ("up", "Up ↑ [U]", lambda: c.propagate("up"), 1, 1),
            ("down", "Down ↓ [D]", lambda: c.propagate("down"), 1, 2),
            ("stop", "Stop here [X]", c.stop_here, 0, 2),
            ("undo", "Undo [Ctrl+Z]", c.undo, 2, 0),
            ("redo", "Redo", c.redo, 2, 1),
            ("clear", "Clear object [C]", c.clear_object, 2, 2),
        ]
        for key, text, slot, r, col in specs:
            b = QPushButton(text)
            b.clicked.connect(lambda _=False, s=slot: s())
            grid.addWidget(b, r, col)
            self.buttons[key] = b
        self.repropagate_check = QCheckBox("Re-propagate after a correction")
        self.repropagate_check.setChecked(True)
        grid.addWidget(self.repropagate_check, 3, 0, 1, 3)
        self.precompute_btn = QPushButton("Precompute embeddings")
        self.precompute_btn.setToolTip("Encode every slice in the background, so later prompts only decode.")
        self.precompute_btn.clicked.connect(lambda: c.precompute())
        grid.addWidget(self.precompute_btn, 4, 0, 1, 2)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(c.cancel)
        grid.addWidget(self.cancel_btn, 4, 2)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.progress.setFormat("%v / %m")
        grid.addWidget(self.progress, 5, 0, 1, 3)
        self.progress_label = QLabel("")
        grid.addWidget(self.progress_label, 6, 0, 1, 3)
        root.addWidget(actions)

        # ------------------------------------------------------------ review
        review = QGroupBox("Review")
        lay = QVBoxLayout(review)
        self.confidence_strip = ConfidenceStrip(c.strip_clicked)
        lay.addWidget(self.confidence_strip)
        row = QHBoxLayout()
        self.review_btn = QPushButton("Least sure slice [G]")
        self.review_btn.setToolTip("Go to the least confident propagated slice you have not reviewed yet.")
        self.review_btn.clicked.connect(lambda: c.review_next())
        self.review_label = QLabel("Propagate an object to see how sure each slice is.")
        self.review_label.setWordWrap(True)
        row.addWidget(self.review_btn)
        row.addWidget(self.review_label, 1)
        lay.addLayout(row)
        root.addWidget(review)

        # ------------------------------------------------------------ save
        export = QGroupBox("Save")
        row = QHBoxLayout(export)
        self.export_btn = QPushButton("Export label map…")
        self.export_btn.clicked.connect(lambda: c.export())
        self.per_object_check = QCheckBox("+ one file per object")
        self.restore_btn = QPushButton("Restore autosave")
        self.restore_btn.setEnabled(False)
        self.restore_btn.clicked.connect(lambda: c.restore_autosave())
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
        self.setToolTip(f"Keyboard shortcuts — {shortcuts_text()}")
        root.addStretch(1)
        self.show_history(False, False)
        self.set_active(False)

    # ------------------------------------------------------------ settings the user chose
    def model_name(self) -> str:
        return self.model_combo.currentText().strip() or DEFAULT_MODEL

    def device_name(self) -> str:
        return self.device_combo.currentText()

    def show_model(self, name: str, device: str) -> None:
        """Show a model and device choice without calling back (a refused choice goes back to the last good one)."""
        for combo, text in ((self.model_combo, name), (self.device_combo, device)):
            edit = combo.lineEdit()
            combo.blockSignals(True)
            if edit is not None:
                edit.blockSignals(True)
            try:
                index = combo.findText(text)
                if index >= 0:
                    combo.setCurrentIndex(index)
                if edit is not None:
                    combo.setEditText(text)
            finally:
                if edit is not None:
                    edit.blockSignals(False)
                combo.blockSignals(False)

    def window_choice(self):
        """The window chosen: a preset name, "mr", or (level, width) for "custom"."""
        choice = self.window_combo.currentText()
        if choice == "custom":
            return (self.level_spin.value(), self.width_spin.value())
        return choice

    def set_modality(self, modality: str) -> None:
        """CT: the window presets and their level/width in HU. MR: the percentiles the scan is scaled by,
        and no CT window to choose."""
        mr = str(modality).upper() != "CT"
        self.window_combo.setEnabled(not mr)
        self.ct_fields.setVisible(not mr)
        self.mr_note.setVisible(mr)

    def show_window(self, choice: str, level: float | None = None, width: float | None = None) -> None:
        """Show a window choice (and its level/width) without calling back."""
        if level is not None and width is not None:
            self.level_spin.setValue(level)
            self.width_spin.setValue(width)
        if self.window_combo.currentText() != choice:
            self.window_combo.blockSignals(True)
            self.window_combo.setCurrentText(choice)
            self.window_combo.blockSignals(False)
        self.level_spin.setEnabled(choice == "custom")
        self.width_spin.setEnabled(choice == "custom")

    def _on_window_choice(self, choice: str) -> None:
        preset = WINDOW_PRESETS.get(choice)
        self.show_window(choice, *(preset or (None, None)))
        self.controller.set_window(choice)

    def show_overlap(self, mode: str) -> None:
        text = {v: k for k, v in OVERLAP_CHOICES.items()}[mode]
        if self.overlap_combo.currentText() != text:
            self.overlap_combo.blockSignals(True)
            self.overlap_combo.setCurrentText(text)
            self.overlap_combo.blockSignals(False)

    def overlap_mode(self) -> str:
        return OVERLAP_CHOICES[self.overlap_combo.currentText()]

    def _browse_checkpoint(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(self, "MedSAM checkpoint", "", "Checkpoints (*.pth *.pt *.ckpt)")
        if path:
            self.model_combo.setEditText(path)

    # ------------------------------------------------------------ objects
    def show_objects(self, rows, current: int | None) -> None:
        """The object list: rows of (label id, name, (r, g, b), volume in mL, locked, hidden, mL of the preview
        on screen or None)."""
        self.object_list.blockSignals(True)
        try:
            self.object_list.clear()
            for label_id, name, color, ml, locked, hidden, preview in rows:
                lock = " · locked" if locked else ""
                shown = f" · preview {preview:.1f} mL" if preview is not None else ""
                about = "≈" if self.volumes_approximate else ""
                item = QListWidgetItem(swatch(color), f"{name}{VOLUME_SUFFIX}{about}{ml:.1f} mL{shown}{lock}")
                item.setData(Qt.UserRole, label_id)
                item.setToolTip(f"label id {label_id}; {about}{ml:.2f} mL accepted"
                                + (f"; the slice result not accepted yet: {preview:.2f} mL (A accepts it)"
                                   if preview is not None else "")
                                + (f". Approximate: the scan's {self.volumes_approximate}" if about else ""))
                item.setFlags(item.flags() | Qt.ItemIsEditable | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Unchecked if hidden else Qt.Checked)
                self.object_list.addItem(item)
                if label_id == current:
                    self.object_list.setCurrentItem(item)
        finally:
            self.object_list.blockSignals(False)

    def _on_object_item(self, item, previous=None) -> None:
        if item is not None:
            self.controller.select_object(int(item.data(Qt.UserRole)))

    def _on_object_edited(self, item) -> None:
        """A tick box or a name changed in the list."""
        label_id = item.data(Qt.UserRole)
        if label_id is not None:
            self.controller.object_item_edited(int(label_id), item.text().split(VOLUME_SUFFIX)[0],
                                               item.checkState() == Qt.Checked)

    # ------------------------------------------------------------ work in progress
    def set_status(self, text: str) -> None:
        self.status.setText(text)

    def set_active(self, active: bool) -> None:
        """A scan is open (the actions on) or none is (the actions off, and nothing of a closed scan shown)."""
        self._active = bool(active)
        if not active:
            self.object_list.blockSignals(True)
            self.object_list.clear()
            self.object_list.blockSignals(False)
            self.review_label.setText("Propagate an object to see how sure each slice is.")
            self.confidence_strip.clear_strip()
            self.offer_restore(None)
            self._history = (False, False)
        self._enable_actions()

    def _enable_actions(self) -> None:
        on = self._active and not self._busy
        for b in self.buttons.values():
            b.setEnabled(on)
        self.precompute_btn.setEnabled(on)
        self.export_btn.setEnabled(on)
        if on:
            self.show_history(*self._history)

    def set_busy(self, busy: bool, description: str = "") -> None:
        """While long work runs: its progress bar and Cancel on, the actions off."""
        self._busy = busy
        self.progress.setVisible(busy)
        self.progress_label.setVisible(busy)
        self.cancel_btn.setEnabled(busy)
        self._enable_actions()
        if not busy:
            self._stop_countdown()
        if busy:
            self.progress.setRange(0, 0)
            self.progress_label.setText(description)
            self.set_status(f"{description}… (Cancel stops it; nothing is changed until it finishes)")

    def show_history(self, can_undo: bool, can_redo: bool) -> None:
        """Undo and Redo are greyed out when there is nothing to take back or to redo."""
        self._history = (bool(can_undo), bool(can_redo))
        if self._active and not self._busy:
            self.buttons["undo"].setEnabled(self._history[0])
            self.buttons["redo"].setEnabled(self._history[1])

    def show_progress(self, progress, started: float) -> None:
        """The bar: slices done of about how many, and the time left at the pace so far. A slow one-time
        step (`Progress.kind == "prepare"`, e.g. converting the fast encoder) shows its own message in
        the status line, with its estimate counted down."""
        self._stop_countdown()
        if getattr(progress, "kind", "work") == "prepare":
            self._show_prepare(str(getattr(progress, "message", "") or "Preparing the model..."),
                               getattr(progress, "estimate_s", None))
            return
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

    def _show_prepare(self, message: str, estimate_s: float | None) -> None:
        self.progress.setRange(0, 0)  # a busy bar: the step reports no fraction
        self.set_status(f"{message} The panel goes on by itself when it is done; Cancel stops it.")
        self.progress_label.setText(message)
        if estimate_s:
            from qtpy.QtCore import QTimer

            self._countdown = (message, time.perf_counter() + float(estimate_s))
            if self._countdown_timer is None:
                self._countdown_timer = QTimer(self)
                self._countdown_timer.timeout.connect(self._tick_countdown)
            self._countdown_timer.start(1000)
            self._tick_countdown()

    def _tick_countdown(self) -> None:
        if self._countdown is None:
            return
        message, end = self._countdown
        left = end - time.perf_counter()
        self.progress_label.setText(f"{message} about {left:.0f} s left" if left >= 1
                                    else f"{message} taking longer than estimated, still working")

    def _stop_countdown(self) -> None:
        self._countdown = None
        if self._countdown_timer is not None:
            self._countdown_timer.stop()

    # ------------------------------------------------------------ autosave offer
    def offer_restore(self, text: str | None) -> None:
        """Show the offer to restore an autosave (`text`), or take it away (None)."""
        self.restore_btn.setEnabled(text is not None)
        self.restore_banner.setText(text or "")
        self.restore_banner.setVisible(text is not None)
