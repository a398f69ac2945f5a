"""The Dataset dock widget: a folder of scans annotated case by case, and fine-tuning on the done ones.

An adapter over `medsam_plugin.dataset` (the worklist, saving, the fine-tune job) and the MedSAM
dock widget (`widget.controller.MedSAMWidget`, which segments the open case): this panel opens a
case (the scan through the plugin's reader, then the saved labels and prompts through
`MedSAMWidget.load_work`), saves it (`Dataset.save_case` with `MedSAMWidget.work_state`), and
moves through the list. Shortcuts (on the viewer): Shift+N next case to do, Shift+B previous
case, Shift+K skip, Shift+S save.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

log = logging.getLogger(__name__)

# key -> (method, description)
SHORTCUTS = {
    "Shift-N": ("next_case", "next case to do"),
    "Shift-B": ("previous_case", "previous case"),
    "Shift-K": ("skip_case", "skip this case"),
    "Shift-S": ("save_case", "save this case"),
}
STATUS_TEXT = {"todo": "to do", "in_progress": "in progress", "done": "done", "skipped": "skipped"}
MEDSAM_WIDGET = ("medsam-plugin", "MedSAM segmentation")


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications

    {"info": notifications.show_info, "warning": notifications.show_warning,
     "error": notifications.show_error}[kind](message)


class DatasetWidget(QWidget):
    """Annotate a folder of scans case by case (see the module's docstring).

    Args:
        napari_viewer: the viewer (napari passes it).
        medsam_widget: the MedSAM widget to segment with; default: the one docked in the viewer
            (docked now if it is not).
        ask_unsaved: called with the case name when leaving a case with unsaved work; returns
            "save", "discard" or "cancel". Default: a dialog.
        inline: run the fine-tune in the GUI thread (tests); default: a napari worker.
    """

    def __init__(self, napari_viewer, medsam_widget=None, ask_unsaved=None, inline: bool | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self._medsam = medsam_widget
        self.ask_unsaved = ask_unsaved or self._ask_unsaved_dialog
        self.inline = inline
        self.dataset = None
        self.current: str | None = None
        self.image_layer = None
        self._saved_print: str | None = None
        self.train_task = None
        self.outcome = None
        self._build()
        for key, (method, _) in SHORTCUTS.items():
            self.viewer.bind_key(key, lambda _v=None, _m=method: getattr(self, _m)(), overwrite=True)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.cancel_training()  # the child process must not outlive the panel
        for key in SHORTCUTS:
            try:
                self.viewer.bind_key(key, None)
            except Exception:  # the viewer is closing
                pass
        super().closeEvent(event)

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        self.open_button = QPushButton("Open dataset folder…")
        self.open_button.clicked.connect(lambda: self.open_folder())
        row.addWidget(self.open_button)
        layout.addLayout(row)
        self.folder_label = QLabel("No dataset open: choose a folder of scans, or a Decathlon folder.")
        self.folder_label.setWordWrap(True)
        layout.addWidget(self.folder_label)
        self.progress_label = QLabel("")
        self.progress_bar = QProgressBar()
        self.progress_bar.setFormat("%v of %m done")
        layout.addWidget(self.progress_label)
        layout.addWidget(self.progress_bar)
        self.case_list = QListWidget()
        self.case_list.setMinimumHeight(120)  # docked under the MedSAM panel, it keeps a few rows visible
        self.case_list.itemDoubleClicked.connect(lambda item: self.open_case(item.data(Qt.UserRole)))
        layout.addWidget(self.case_list, 1)
        nav = QHBoxLayout()
        self.prev_button = QPushButton("◀ Previous")
        self.next_button = QPushButton("Next ▶")
        self.skip_button = QPushButton("Skip")
        self.save_button = QPushButton("Save case")
        for b, m in ((self.prev_button, self.previous_case), (self.next_button, self.next_case),
                     (self.skip_button, self.skip_case), (self.save_button, self.save_case)):
            b.clicked.connect(lambda _=False, _m=m: _m())
            nav.addWidget(b)
        layout.addLayout(nav)
        hint = QLabel("Shift+N next · Shift+B previous · Shift+K skip · Shift+S save")
        hint.setStyleSheet("color: gray")
        layout.addWidget(hint)

        train = QGroupBox("Fine-tune on the done cases")
        tl = QVBoxLayout(train)
        settings = QHBoxLayout()
        settings.addWidget(QLabel("steps"))
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100000)
        self.steps_spin.setValue(200)
        settings.addWidget(self.steps_spin)
        settings.addWidget(QLabel("at most (min)"))
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.5, 24 * 60)
        self.minutes_spin.setValue(10)
        settings.addWidget(self.minutes_spin)
        self.resume_check = QCheckBox("resume")
        self.resume_check.setToolTip("Go on from the last saved step of an earlier (cancelled) run.")
        settings.addWidget(self.resume_check)
        tl.addLayout(settings)
        buttons = QHBoxLayout()
        self.train_button = QPushButton("Train on done cases")
        self.train_button.clicked.connect(lambda: self.train())
        self.cancel_train_button = QPushButton("Cancel")
        self.cancel_train_button.setEnabled(False)
        self.cancel_train_button.clicked.connect(lambda: self.cancel_training())
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.cancel_train_button)
        tl.addLayout(buttons)
        self.train_bar = QProgressBar()
        self.train_bar.setVisible(False)
        tl.addWidget(self.train_bar)
        self.train_label = QLabel("")
        self.train_label.setWordWrap(True)
        tl.addWidget(self.train_label)
        self.use_model_button = QPushButton("Use the new model")
        self.use_model_button.setVisible(False)
        self.use_model_button.clicked.connect(lambda: self.use_trained_model())
        tl.addWidget(self.use_model_button)
        layout.addWidget(train)

    # ------------------------------------------------------------------ the MedSAM widget
    @property
    def medsam(self):
        if self._medsam is None:
            _, self._medsam = self.viewer.window.add_plugin_dock_widget(*MEDSAM_WIDGET)
        return self._medsam

    # ------------------------------------------------------------------ dataset
    def open_folder(self, path=None) -> bool:
        from ..dataset import Dataset

        if path is None:
            path = QFileDialog.getExistingDirectory(self, "Dataset folder (scans, or imagesTr/ + dataset.json)")
            if not path:
                return False
        if not self._may_leave():
            return False
        try:
            self.dataset = Dataset(path)
        except Exception as exc:
            _notify("error", str(exc))
            return False
        self._close_case()
        self.folder_label.setText(f"{self.dataset.root}  ({'Decathlon layout' if self.dataset.decathlon else 'folder of scans'})")
        self.refresh()
        return True

    def refresh(self) -> None:
        """Show the cases, their status and object volumes, and the progress."""
        ds = self.dataset
        if ds is None:
            return
        names = ds.label_names()
        self.case_list.clear()
        for c in ds.cases:
            volumes = ", ".join(f"{names.get(k, f'label {k}')} {v:.1f} mL" for k, v in sorted(c.objects.items()))
            text = f"{'▶ ' if c.name == self.current else ''}{c.name}  —  {STATUS_TEXT[c.status]}"
            if c.split == "test":
                text += " (test)"
            if volumes:
                text += f"  —  {volumes}"
            item = QListWidgetItem(text)
            item.setData(Qt.UserRole, c.name)
            self.case_list.addItem(item)
            if c.name == self.current:
                self.case_list.setCurrentItem(item)
        counts = ds.counts()
        self.progress_label.setText(ds.progress_text())
        self.progress_bar.setMaximum(len(ds.cases))
        self.progress_bar.setValue(counts["done"])

    # ------------------------------------------------------------------ moving between cases
    def next_case(self) -> str | None:
        if self.dataset is None:
            return None
        target = self.dataset.neighbour(self.current, 1, todo_only=True) or self.dataset.neighbour(self.current, 1)
        if target is None:
            _notify("info", f"No case left to do: {self.dataset.progress_text()}.")
            return None
        return self.open_case(target.name)

    def previous_case(self) -> str | None:
        if self.dataset is None:
            return None
        target = self.dataset.neighbour(self.current, -1)
        return self.open_case(target.name) if target is not None else None

    def skip_case(self) -> str | None:
        if self.dataset is None or self.current is None:
            return None
        name = self.current
        self._saved_print = self._fingerprint()  # leaving a skipped case loses nothing worth asking about
        self.dataset.set_status(name, "skipped")
        self.refresh()
        return self.next_case()

    def _fingerprint(self) -> str | None:
        from ..dataset import work_fingerprint

        w = self.medsam
        if w.session is None:
            return None
        state = w.work_state(accept_pending=False)  # asking must not change the work
        if state.get("pending"):
            return "a slice result not accepted"  # never the saved fingerprint: leaving asks
        return work_fingerprint(w.session.labels.array, state)

    def has_unsaved_work(self) -> bool:
        return self.current is not None and self.medsam.session is not None and self._fingerprint() != self._saved_print

    def _may_leave(self) -> bool:
        if not self.has_unsaved_work():
            return True
        answer = self.ask_unsaved(self.current)
        if answer == "save":
            return self.save_case() is not None
        return answer == "discard"

    def _ask_unsaved_dialog(self, name: str) -> str:
        box = QMessageBox(self)
        box.setWindowTitle("Unsaved work")
        box.setText(f"Case '{name}' has work that is not saved.")
        save = box.addButton("Save", QMessageBox.AcceptRole)
        discard = box.addButton("Discard", QMessageBox.DestructiveRole)
        box.addButton("Stay", QMessageBox.RejectRole)
        box.exec()
        return "save" if box.clickedButton() is save else "discard" if box.clickedButton() is discard else "cancel"

    def _close_case(self) -> None:
        if self.image_layer is not None and self.image_layer in self.viewer.layers:
            self.viewer.layers.remove(self.image_layer)
        self.image_layer = None
        self.current = None

    def open_case(self, name: str) -> str | None:
        """Open a case: its scan, then its saved labels and prompts (or the dataset's objects, empty)."""
        ds = self.dataset
        if ds is None or name == self.current:
            return self.current
        if not self._may_leave():
            return None
        case = ds.case(name)
        w = self.medsam
        if w._busy():
            _notify("warning", "Wait for the running segmentation to end (or Cancel it) before changing case.")
            return None
        self._close_case()
        try:
            layers = self.viewer.open(str(case.image), plugin="medsam-plugin")
        except Exception as exc:
            _notify("error", f"Could not open case '{name}': {exc}")
            self.refresh()
            return None
        self.image_layer = layers[0] if layers else None
        if w.session is None or w.image_layer is not self.image_layer:
            w.start_session(self.image_layer)
        if w.session is None:
            return None
        try:
            self._restore(case)
        except Exception as exc:
            _notify("error", f"The saved work of case '{name}' could not be restored ({exc}); the scan is open "
                             f"without it.")
        self.current = name
        self._saved_print = self._fingerprint()
        if case.status == "todo":
            ds.set_status(name, "in_progress")
        self.refresh()
        w._set_status(f"Case {name} ({ds.index(name) + 1} of {len(ds.cases)}): {ds.progress_text()}.")
        return name

    def _restore(self, case) -> None:
        w = self.medsam
        session = w.session
        labels_ijk, state = self.dataset.load_case(case.name, session.volume)
        if labels_ijk is not None:
            labels_zyx = session.view.to_view(labels_ijk)
        else:
            labels_zyx = np.zeros(session.shape_zyx, dtype=session.labels.array.dtype)
        if state is None or tuple(state.get("shape_zyx", session.shape_zyx)) != tuple(session.shape_zyx) \
                or state.get("axis", session.view.axis) != session.view.axis:
            state = {"objects": []}  # labels made elsewhere, or on another view: the voxels alone
        known = {int(o["label_id"]) for o in state.get("objects", [])}
        present = {int(v) for v in np.unique(labels_zyx) if v != 0}
        # every case starts with the dataset's objects (shared names and colours)
        state["objects"] = list(state.get("objects", [])) + [
            {k: v for k, v in o.items() if v is not None} for o in self.dataset.shared_objects()
            if o["label_id"] not in known]
        named = {int(o["label_id"]) for o in state["objects"]}
        state["objects"] += [{"label_id": v} for v in sorted(present - named)]
        if state["objects"]:
            w.load_work(labels_zyx, state)

    # ------------------------------------------------------------------ saving
    def save_case(self) -> list | None:
        """Save the open case: label map, prompts and brush edits, session state; it becomes done."""
        from ..dataset.replay import prompts_document, session_edits_ijk

        if self.dataset is None or self.current is None:
            _notify("warning", "Open a case first (Next, or double-click one in the list).")
            return None
        w = self.medsam
        if w.session is None or w._busy():
            _notify("warning", "Wait for the running segmentation to end before saving.")
            return None
        state = w.work_state()
        s = w.session
        try:
            written = self.dataset.save_case(
                self.current, s.labels_ijk(), s.volume, s.labels.names(),
                {k: o.color for k, o in s.labels.objects.items()},
                prompts=prompts_document(s, w.model_name()), edits=session_edits_ijk(s), session_state=state)
        except Exception as exc:
            _notify("error", f"Case '{self.current}' was not saved: {exc}")
            return None
        self._saved_print = self._fingerprint()
        self.refresh()
        w._set_status(f"Saved case {self.current} ({len(written)} files). {self.dataset.progress_text()}.")
        return written

    # ------------------------------------------------------------------ training
    def train(self):
        """Fine-tune on the done cases in the background (progress bar, Cancel); at the end, report the
        held-out Dice before/after and offer the new model."""
        from ._tasks import start_task

        if self.dataset is None:
            _notify("warning", "Open a dataset folder first.")
            return None
        if self.train_task is not None and self.train_task.running:
            return self.train_task
        from ..dataset.train import plan_finetune

        try:
            plan_finetune(self.dataset)  # refuses with a sentence before anything starts
        except Exception as exc:
            _notify("warning", str(exc))
            return None
        base = self.medsam.model_name()
        job = dict(base_model=base, steps=self.steps_spin.value(), max_minutes=self.minutes_spin.value(),
                   val_every=max(1, min(50, self.steps_spin.value() // 4)), resume=self.resume_check.isChecked())
        job.update(self.job_overrides())

        def work(cancel):
            from ..dataset.train import finetune_dataset

            return (yield from finetune_dataset(self.dataset, cancel=cancel, **job))

        def progress(p):
            self.train_bar.setMaximum(max(1, p.total))
            self.train_bar.setValue(p.done)
            self.train_label.setText(p.message)

        def finished(outcome):
            self.outcome = outcome
            self.train_label.setText(outcome.sentence())
            self.use_model_button.setVisible(True)
            self.use_model_button.setToolTip(str(outcome.checkpoint))
            _notify("info", f"Training done: {outcome.sentence()} Press 'Use the new model' to segment with it.")

        def failed(exc):
            _notify("error", str(exc))
            self.train_label.setText(str(exc))

        def ended(cancelled):
            self.train_button.setEnabled(True)
            self.cancel_train_button.setEnabled(False)
            self.train_bar.setVisible(False)
            if cancelled:
                self.train_label.setText("Training cancelled; tick 'resume' and press Train to go on from the last "
                                         "saved step.")
                self.resume_check.setChecked(True)

        self.train_button.setEnabled(False)
        self.cancel_train_button.setEnabled(True)
        self.train_bar.setVisible(True)
        self.use_model_button.setVisible(False)
        self.train_task = start_task(work, "Fine-tuning on the done cases", on_yield=progress, on_return=finished,
                                     on_error=failed, on_finish=ended, inline=self.inline)
        return self.train_task

    def job_overrides(self) -> dict:
        """More settings of the fine-tune job (tests make it tiny)."""
        return {}

    def cancel_training(self) -> None:
        if self.train_task is not None and self.train_task.running:
            self.train_task.cancel()

    def use_trained_model(self) -> None:
        if self.outcome is None:
            return
        w = self.medsam
        w.panel.model_combo.setEditText(str(self.outcome.checkpoint))
        w.change_model()
