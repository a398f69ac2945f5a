"""A folder of scans as a worklist: cases, their status, and label maps saved into a Decathlon layout.

Two layouts are opened:

- a Decathlon / nnU-Net folder: ``dataset.json``, ``imagesTr/``, ``labelsTr/`` (and ``imagesTs/``);
- a plain folder of scans: NIfTI, NRRD, MHA files and DICOM series folders, at its top level.

Either way the images are only read. Saving a case writes, as one atomic set, its label map
``labelsTr/<case>.nii.gz`` on the scan's exact voxel grid (with the usual name/colour sidecars),
the prompts that made it (``labelsTr/<case>.prompts.json``, the CLI's prompts-file format), its
brush edits (``labelsTr/<case>.edits.npz``) and the interactive session's state
(``.medsam/cases/<case>.session.json``, what the napari panel restores); then it adds the case to
``dataset.json`` (``training`` list and ``labels`` names, read by MONAI's
``load_decathlon_datalist``). The per-case status (todo, in_progress, done, skipped), the shared
label colours and the models trained on the dataset live in ``.medsam/state.json``.

Every update of ``dataset.json`` and of the state file takes a file lock, reads the file again and
merges one entry into it before the atomic rename, so two processes on one folder lose nothing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..io.atomic import atomic_write_json, json_safe
from ..io.writers import _rgba255
from ..io.formats import IMAGE_SUFFIXES, NIFTI_SUFFIXES, has_suffix, strip_suffix

STATUSES = ("todo", "in_progress", "done", "skipped")
META_DIR = ".medsam"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
DATALIST = "dataset.json"
LABEL_SUFFIX = ".nii.gz"
PROMPTS_SUFFIX = ".prompts.json"
EDITS_SUFFIX = ".edits.npz"
STATE_FORMAT = "medsam_plugin.dataset/1"
# Scans a plain folder may hold (the formats `read_volume` reads as 3D scans; .dcm files are
# series members, found as folders).
SCAN_FILE_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr", ".mha", ".mhd")


class DatasetError(ValueError):
    """A dataset folder or a case that cannot be used; the message says what to do."""


@dataclass
class Case:
    """One scan of the dataset.

    `image` and `label` are absolute paths; `label` may not exist yet. `split` is "training"
    (imagesTr/ or a plain folder) or "test" (imagesTs/). `objects` maps label id -> volume (mL)
    as last saved.
    """

    name: str
    image: Path
    label: Path
    split: str = "training"
    status: str = "todo"
    objects: dict[int, float] = field(default_factory=dict)
    updated: str | None = None

    @property
    def prompts_path(self) -> Path:
        return self.label.with_name(self.name + PROMPTS_SUFFIX)

    @property
    def edits_path(self) -> Path:
        return self.label.with_name(self.name + EDITS_SUFFIX)

    @property
    def has_label(self) -> bool:
        return self.label.is_file()


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def case_name_of(image: Path) -> str:
    """The case name of an image: its name without the image suffix, and without nnU-Net's channel
    suffix ``_0000`` (imagesTr/liver_3_0000.nii.gz and labelsTr/liver_3.nii.gz are one case)."""
    stem = strip_suffix(image, IMAGE_SUFFIXES, stem=True) if image.is_file() or has_suffix(image, IMAGE_SUFFIXES) \
        else image.name
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        stem = stem[:-5]
    return stem


def _is_dicom_folder(folder: Path) -> bool:
    try:
        for p in folder.iterdir():
            if p.is_file() and p.suffix.lower() == ".dcm":
                return True
            if p.is_file() and p.stat().st_size > 132:
                with open(p, "rb") as fh:
                    if fh.read(132)[128:132] == b"DICM":
                        return True
    except OSError:
        return False
    return False


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float = 60.0) -> Iterator[None]:
    """An exclusive lock between processes on `path` (created if missing): fcntl on POSIX, msvcrt on
    Windows. Held for a read-merge-write of one shared file, never across user interaction."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+b")
    try:
        deadline = time.monotonic() + timeout_s
        try:
            import fcntl

            def try_lock() -> bool:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    return False

            def unlock() -> None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        except ImportError:  # pragma: no cover - Windows
            import msvcrt

            def try_lock() -> bool:
                try:
                    fh.seek(0)
                    msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
                    return True
                except OSError:
                    return False

            def unlock() -> None:
                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        while not try_lock():
            if time.monotonic() > deadline:
                raise DatasetError(f"Another program has held the dataset lock {path} for over {timeout_s:.0f} s; "
                                   f"close it (another napari or medsam-plugin on this folder) and try again.")
            time.sleep(0.02)
        try:
            yield
        finally:
            unlock()
    finally:
        fh.close()


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"The {what} {path} is not valid JSON ({exc}); fix or remove it.") from None
    if not isinstance(data, dict):
        raise DatasetError(f"The {what} {path} must hold a JSON object.")
    return data


def _rel(path: Path, root: Path) -> str:
    """A path as dataset.json writes it: relative to the dataset folder, "./" first (as MSD does)."""
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    return rel if rel.startswith(".") else "./" + rel


def labels_by_value(raw) -> dict[int, str]:
    """A dataset.json ``labels`` entry as {value: name}, from either order: value -> name (MSD,
    MONAI) or name -> value (nnU-Net v2; a region given as a list of values takes its first)."""
    if not raw:
        return {}
    if isinstance(raw, list):
        return {i: str(v) for i, v in enumerate(raw)}
    if not isinstance(raw, dict):
        raise DatasetError("The dataset.json 'labels' entry must map label values to names.")
    out: dict[int, str] = {}
    for k, v in raw.items():
        if str(k).strip().lstrip("-").isdigit():
            out[int(k)] = str(v)
        elif isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
            out[int(v)] = str(k)
        elif isinstance(v, list) and v and isinstance(v[0], int):
            out[int(v[0])] = str(k)
        else:
            raise DatasetError(f"The dataset.json 'labels' entry {k!r}: {v!r} is neither value -> name nor "
                               f"name -> value.")
    return out


class Dataset:
    """A dataset folder opened as a worklist (see the module's docstring).

    `cases` are listed in name order (training cases first, then test cases). Status changes and
    saves go to disk at once; `refresh()` reads what another process wrote.
    """

    def __init__(self, root: str | os.PathLike):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"The dataset folder {root} does not exist or is not a folder; choose a folder "
                               f"with scans (or with dataset.json, imagesTr/ and labelsTr/).")
        self.root = root.resolve()
        self.meta = self.root / META_DIR
        self.state_path = self.meta / STATE_FILE
        self.lock_path = self.meta / LOCK_FILE
        self.datalist_path = self.root / DATALIST
        self.decathlon = (self.root / "imagesTr").is_dir()
        self.labels_dir = self.root / "labelsTr"
        self.cases: list[Case] = []
        self.refresh()
        if not self.cases:
            raise DatasetError(f"No scans found in {self.root}: put NIfTI, NRRD or MHA files or DICOM series folders "
                               f"there, or a Decathlon layout (imagesTr/ with dataset.json).")

    # ---------------------------------------------------------------------------------- listing
    def _images(self) -> list[tuple[Path, str]]:
        found: dict[Path, str] = {}
        raw = _read_json(self.datalist_path, "datalist")
        for key, split in (("training", "training"), ("test", "test")):
            for item in raw.get(key, []) or []:
                image = item.get("image") if isinstance(item, dict) else item
                if isinstance(image, str) and image and (self.root / image).exists():
                    found.setdefault((self.root / image).resolve(), split)
        if self.decathlon:
            places = [(self.root / "imagesTr", "training"), (self.root / "imagesTs", "test")]
        else:  # a plain folder: the scans at its top level (dataset.json and labelsTr/ are ours)
            places = [(self.root, "training")]
        for folder, split in places:
            if not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                if p.name.startswith(".") or p.name in ("labelsTr", "labelsTs", META_DIR, "replayed"):
                    continue
                if (p.is_file() and has_suffix(p, SCAN_FILE_SUFFIXES)) or (p.is_dir() and _is_dicom_folder(p)):
                    found.setdefault(p.resolve(), split)
        return sorted(found.items(), key=lambda kv: (kv[1] != "training", case_name_of(kv[0])))

    def refresh(self) -> None:
        """Read the folder, dataset.json and the state file again."""
        state = self._read_state()
        labels_in_datalist = {}
        if self.datalist_path.is_file():
            for item in _read_json(self.datalist_path, "datalist").get("training", []) or []:
                if isinstance(item, dict) and isinstance(item.get("image"), str) and isinstance(item.get("label"), str):
                    labels_in_datalist[(self.root / item["image"]).resolve()] = (self.root / item["label"]).resolve()
        cases, seen = [], set()
        for image, split in self._images():
            name = case_name_of(image)
            if name in seen:  # two files with one case name (a.nii and a.nii.gz): keep them apart
                name = f"{name}~{len(seen)}"
            seen.add(name)
            label = labels_in_datalist.get(image, self.labels_dir / (name + LABEL_SUFFIX))
            entry = state.get("cases", {}).get(name, {})
            status = entry.get("status", "todo")
            if status not in STATUSES:
                status = "todo"
            if "status" not in entry and split == "training" and label.is_file():
                status = "done"  # a Decathlon folder's own labels count as done
            objects = {int(k): float(v) for k, v in (entry.get("objects") or {}).items()}
            cases.append(Case(name, image, label, split, status, objects, entry.get("updated")))
        self.cases = cases
        self.state = state

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise DatasetError(f"There is no case named {name!r} in {self.root}.")

    def index(self, name: str) -> int:
        return [c.name for c in self.cases].index(self.case(name).name)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for c in self.cases:
            out[c.status] += 1
        return out

    def progress_text(self) -> str:
        """'12 of 40 done' (and how many are skipped or in progress, when any)."""
        n = self.counts()
        extra = [f"{n[s]} {s.replace('_', ' ')}" for s in ("in_progress", "skipped") if n[s]]
        return f"{n['done']} of {len(self.cases)} done" + (f" ({', '.join(extra)})" if extra else "")

    def neighbour(self, name: str | None, step: int = 1, todo_only: bool = False) -> Case | None:
        """The case `step` places after `name` (before it for a negative step); with `todo_only`,
        the next one not done nor skipped, wrapping round. None at an end / when none is left."""
        names = [c.name for c in self.cases]
        i = names.index(name) if name in names else (-1 if step > 0 else len(names))
        if not todo_only:
            j = i + step
            return self.cases[j] if 0 <= j < len(self.cases) else None
        n = len(self.cases)
        for k in range(1, n + 1):
            c = self.cases[(i + k * (1 if step > 0 else -1)) % n]
            if c.status in ("todo", "in_progress") and c.name != name:
                return c
        return None

    # ---------------------------------------------------------------------------------- state
    def _read_state(self) -> dict:
        state = _read_json(self.state_path, "dataset state file")
        state.setdefault("format", STATE_FORMAT)
        state.setdefault("cases", {})
        return state

    @contextlib.contextmanager
    def _locked(self):
        with file_lock(self.lock_path):
            yield

    def _update_state(self, change) -> dict:
        """Apply `change(state)` to the state file under the lock, on what is on disk now."""
        with self._locked():
            state = self._read_state()
            change(state)
            self.meta.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.state_path, state)
        self.state = state
        return state

    def set_status(self, name: str, status: str) -> None:
        if status not in STATUSES:
            raise DatasetError(f"Unknown status {status!r}; use one of {', '.join(STATUSES)}.")
        case = self.case(name)

        def change(state):
            entry = state["cases"].setdefault(case.name, {})
            entry["status"] = status
            entry["updated"] = _now()

        self._update_state(change)
        case.status, case.updated = status, self.state["cases"][case.name]["updated"]

    def label_names(self) -> dict[int, str]:
        """The dataset's label names {value: name} (background left out), from dataset.json."""
        if not self.datalist_path.is_file():
            return {}
        names = labels_by_value(_read_json(self.datalist_path, "datalist").get("labels"))
        return {k: v for k, v in names.items() if k != 0}

    def label_colors(self) -> dict[int, tuple]:
        return {int(k): tuple(int(c) for c in v) for k, v in (self.state.get("colors") or {}).items()}

    def check_labels(self, names: dict[int, str]) -> None:
        """Refuse names that contradict the dataset's: a label value is one structure in every case."""
        known = self.label_names()
        for value, name in sorted(names.items()):
            if value in known and known[value].strip().lower() != str(name).strip().lower():
                raise DatasetError(f"Label {value} is '{known[value]}' in this dataset but '{name}' in this case: "
                                   f"rename the object to '{known[value]}', or give '{name}' another label value.")

    def shared_objects(self) -> list[dict]:
        """The objects every case starts with: [{"label_id", "name", "color"}] in value order."""
        colors = self.label_colors()
        return [{"label_id": k, "name": v, "color": list(colors[k]) if k in colors else None}
                for k, v in sorted(self.label_names().items())]

    # ---------------------------------------------------------------------------------- saving
    def session_path(self, name: str) -> Path:
        return self.meta / "cases" / f"{name}.session.json"

    def save_case(self, name: str, labels_ijk: np.ndarray, volume, names: dict[int, str],
                  colors: dict[int, tuple] | None = None, prompts: dict | None = None,
                  edits: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
                  session_state: dict | None = None,
                  status: str = "done") -> list[Path]:
        """Save a case's work and mark it `status`; returns the files written.

        labels_ijk: (I, J, K) integer label map on `volume`'s stored grid (`SegmentationSession.labels_ijk`).
        prompts: the prompts document (`replay.prompts_document`); written beside the label map.
        edits: {label id: (added_ijk, erased_ijk)} bool brush edits; written as a compressed sidecar
            that the prompts file names, so `medsam-plugin segment --prompts` re-applies them.
        session_state: `SegmentationSession.to_state()`, what the napari panel restores.

        The files are one atomic set; dataset.json and the state file are then merged under the lock.
        The image is never written.
        """
        from ..io.writers import plan_label_map, write_planned
        from .replay import edits_items

        case = self.case(name)
        if case.split != "training":
            raise DatasetError(f"Case {name!r} is a test case (imagesTs/): its labels do not go into the training "
                               f"list. Move the scan to imagesTr/ to annotate it for training.")
        names = {int(k): str(v) for k, v in names.items() if int(k) != 0}
        self.check_labels(names)
        labels_ijk = np.asarray(labels_ijk)
        present = sorted(int(v) for v in np.unique(labels_ijk) if v != 0)
        if not present:
            raise DatasetError(f"Case {name!r} has no labelled voxel: segment or paint an object before saving "
                               f"(or press Skip).")
        voxel_ml = float(abs(np.linalg.det(np.asarray(volume.affine_ras)[:3, :3]))) / 1000.0
        volumes = {v: float((labels_ijk == v).sum()) * voxel_ml for v in present}
        case.label.parent.mkdir(parents=True, exist_ok=True)
        items = plan_label_map(case.label, labels_ijk, volume, names, colors)
        doc = dict(prompts) if prompts else None
        if edits:
            items += edits_items(case.edits_path, edits, labels_ijk.shape)
            if doc is not None:
                doc["edits"] = case.edits_path.name
        stale_edits = not edits and case.edits_path.exists()
        if doc is not None:
            text = json.dumps(json_safe(doc), indent=1) + "\n"
            items.append((case.prompts_path, lambda tmp, t=text: Path(tmp).write_text(t, encoding="utf-8"), None))
        if session_state is not None:
            self.session_path(name).parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(json_safe(session_state)) + "\n"
            items.append((self.session_path(name), lambda tmp, t=text: Path(tmp).write_text(t, encoding="utf-8"), None))
        written = write_planned(items)  # one set: all of them replace what was there, or none
        if stale_edits:  # the case's brush edits were undone: an old sidecar would be replayed
            case.edits_path.unlink(missing_ok=True)
        self._add_to_datalist(case, names, volume)

        def change(state):
            entry = state["cases"].setdefault(case.name, {})
            entry.update(status=status, updated=_now(), objects={str(k): round(v, 3) for k, v in volumes.items()})
            if colors:
                known = state.setdefault("colors", {})
                for k, c in colors.items():  # the first colour a label got stays the dataset's
                    known.setdefault(str(int(k)), list(_rgba255(c))[:3])

        self._update_state(change)
        case.status, case.objects = status, volumes
        case.updated = self.state["cases"][case.name]["updated"]
        return written

    def _add_to_datalist(self, case: Case, names: dict[int, str], volume=None) -> None:
        """Merge the case and its label names into dataset.json (under the lock, re-read first)."""
        with self._locked():
            raw = _read_json(self.datalist_path, "datalist")
            raw.setdefault("name", self.root.name)
            raw.setdefault("description", "Annotated with medsam-plugin")
            raw.setdefault("tensorImageSize", "3D")
            modality = str(getattr(volume, "modality", "") or "").upper()
            if "modality" not in raw and modality in ("CT", "MR"):
                raw["modality"] = {"0": modality}
            labels = labels_by_value(raw.get("labels"))
            labels.setdefault(0, "background")
            for value, name in names.items():
                labels.setdefault(int(value), name)
            # MSD / MONAI order (value -> name); nnU-Net v2 reads it through its own converter.
            raw["labels"] = {str(k): labels[k] for k in sorted(labels)}
            image, label = _rel(case.image, self.root), _rel(case.label, self.root)
            training = [t for t in (raw.get("training") or []) if isinstance(t, dict)]
            same = [t for t in training if (self.root / str(t.get("image", ""))).resolve() == case.image]
            entry = same[0] if same else {"image": image}
            entry["label"] = label
            if modality in ("CT", "MR"):
                entry["modality"] = modality  # per case: a cohort may mix CT and MR (training/data.py reads it)
            if not same:
                training.append(entry)
            raw["training"] = training
            raw["numTraining"] = len(training)
            raw.setdefault("test", [])
            raw["numTest"] = len(raw["test"])
            atomic_write_json(self.datalist_path, raw)

    # ---------------------------------------------------------------------------------- loading
    def load_case(self, name: str, volume) -> tuple[np.ndarray | None, dict | None]:
        """A case's saved label map (on `volume`'s grid) and session state; (None, None) when there is none."""
        from ..io import read_labels

        case = self.case(name)
        labels = read_labels(case.label, volume) if case.has_label else None
        state = None
        path = self.session_path(name)
        if path.is_file():
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                state = None  # the label map alone still restores the voxels
        return labels, state

    def done_cases(self) -> list[Case]:
        return [c for c in self.cases if c.status == "done" and c.has_label and c.split == "training"]

    # ---------------------------------------------------------------------------------- models
    def register_model(self, path: str | os.PathLike, info: dict) -> None:
        """Remember a model trained on this dataset (by path), newest last."""
        def change(state):
            models = [m for m in state.setdefault("models", []) if m.get("path") != str(path)]
            models.append({"path": str(path), "time": _now(), **json_safe(info)})
            state["models"] = models

        self._update_state(change)

    def models(self) -> list[dict]:
        return list(self.state.get("models", []))


def work_fingerprint(labels: np.ndarray, state: dict | None) -> str:
    """A digest of a case's work (voxels and the prompts, edits, objects of its state): the panel compares
    it with the one of the last save to know whether leaving the case loses something."""
    h = hashlib.sha1(np.ascontiguousarray(labels).tobytes())
    if state:
        keep = {k: state.get(k) for k in ("objects", "prompts", "edits", "stop_slices")}
        h.update(json.dumps(json_safe(keep), sort_keys=True).encode())
    return h.hexdigest()
