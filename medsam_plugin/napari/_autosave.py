"""Autosave of one scan's work (label volume, objects, prompts) in a cache folder.

The folder is keyed by the scan's absolute path, size and modification time, so opening the same
unchanged scan again finds it, and a changed scan never gets stale labels. Files are written
atomically (io.atomic), so a crash while saving leaves the previous autosave intact.

Layout: `<cache>/<key>/labels_zyx.npy` (view frame, uint8/uint16), `<cache>/<key>/state.json`
(objects, prompts per object in view coordinates, scan path, shape, time).
Cache root: `$MEDSAM_PLUGIN_CACHE`, else `$XDG_CACHE_HOME/medsam_plugin`, else
`~/.cache/medsam_plugin`; autosaves live under `autosave/`.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np

from ..io.cache import cache_root  # noqa: F401  (the one cache root; the widget reads it here)


def scan_key(path) -> str:
    """Hash of the scan's absolute path, size and mtime (a DICOM folder: its files' sizes and mtimes)."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        size = sum(f.stat().st_size for f in files)
        mtime = max((f.stat().st_mtime_ns for f in files), default=p.stat().st_mtime_ns)
    else:
        st = p.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    return hashlib.sha1(f"{p}|{size}|{mtime}".encode()).hexdigest()[:20]


def autosave_dir(path, root: Path | None = None) -> Path:
    return (root or cache_root()) / "autosave" / scan_key(path)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save(folder: Path, labels_zyx: np.ndarray, state: dict) -> Path:
    """Write labels + state atomically into `folder`; returns the folder."""
    from ..io.atomic import atomic_write, atomic_write_text
    from ..io.formats import label_dtype_for

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels_zyx)
    top = int(labels.max()) if labels.size else 0
    labels = labels.astype(label_dtype_for(top))
    buf = io.BytesIO()
    np.save(buf, labels)
    atomic_write(folder / "labels_zyx.npy", lambda tmp: tmp.write_bytes(buf.getvalue()), suffix=".tmp")
    state = dict(state, saved_at=time.strftime("%Y-%m-%d %H:%M:%S"), shape_zyx=list(labels.shape))
    atomic_write_text(folder / "state.json", json.dumps(_jsonable(state), indent=1))
    return folder


def exists(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "labels_zyx.npy").is_file() and (folder / "state.json").is_file()


def load(folder: Path) -> tuple[np.ndarray, dict]:
    """(labels_zyx, state) of an autosave; raises OSError/ValueError when it is unreadable."""
    folder = Path(folder)
    labels = np.load(folder / "labels_zyx.npy", allow_pickle=False)
    state = json.loads((folder / "state.json").read_text())
    return labels, state


def keep_offered(folder: Path) -> Path:
    """Copy the autosave in `folder` to `folder/offered/` and return that: while the user has not
    answered the offer to restore it, new autosaves of new work must not replace it."""
    import shutil

    folder = Path(folder)
    offered = folder / "offered"
    offered.mkdir(parents=True, exist_ok=True)
    for name in ("labels_zyx.npy", "state.json"):
        shutil.copy2(folder / name, offered / name)
    return offered
