"""Atomic file writes: write beside the target, then rename; never leave a partial file."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

# Temporary names: ".<target name>.<pid>.<random>.part<suffixes>" (or ".tmp<suffix>"); the pid lets a
# later run tell the leftovers of a killed run from the files of one still writing.
_LEGACY_STALE_SECONDS = 600


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target_mode(path: Path) -> int:
    """The mode the written file should have: that of the file it replaces, else 0666 & ~umask
    (mkstemp creates 0600, which would hide a result from the rest of the group)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the files themselves are synced
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temporaries(path) -> list[Path]:
    """Remove the temporary files an earlier, killed write of `path` left in its folder.

    A temporary carries its writer's pid: it is stale once that process is gone. Older temporaries
    without a pid are removed after 10 minutes. Returns the files removed.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(r"^\." + re.escape(path.name) + r"\.(?:(\d+)\.)?[^.]+\.(?:part|tmp)")
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or not entry.is_file():
            continue
        try:
            if m.group(1) is not None:
                stale = not _pid_alive(int(m.group(1)))
            else:
                stale = time.time() - entry.stat().st_mtime > _LEGACY_STALE_SECONDS
            if stale:
                entry.unlink()
                removed.append(entry)
        except OSError:
            pass
    return removed


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM until the block ends (main thread only; SIGKILL cannot be held, and leaves
    at most a few microseconds of renames in which a set can be mixed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in pending:
            os.kill(os.getpid(), sig)


_JOURNAL = re.compile(r"^\.medsam-commit\.(\d+)\.[^.]+\.json(\.part)?$")


def _write_journal(folder: Path, pairs: list[tuple[Path, Path]]) -> Path:
    """Record the renames of a set before doing them, so a run killed half-way (SIGKILL, power loss)
    is completed by the next one (`recover_interrupted_sets`) instead of leaving a mixed set."""
    import json

    fd, name = tempfile.mkstemp(prefix=f".medsam-commit.{os.getpid()}.", suffix=".json.part", dir=folder)
    journal = Path(name[: -len(".part")])
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump([[os.path.abspath(t), os.path.abspath(f)] for t, f in pairs], fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(name, journal)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return journal


def recover_interrupted_sets(folder) -> list[Path]:
    """Finish the renames of output sets whose writer died between its first and last rename
    (a journal of a dead process): the set becomes the new one, whole. Returns the files completed."""
    import json

    folder = Path(folder) if str(folder) else Path(".")
    done: list[Path] = []
    try:
        journals = [e for e in folder.iterdir() if _JOURNAL.match(e.name)]
    except OSError:
        return done
    for journal in journals:
        match = _JOURNAL.match(journal.name)
        if _pid_alive(int(match.group(1))):
            continue
        if match.group(2):  # killed while writing the journal: no rename had started
            journal.unlink(missing_ok=True)
            continue
        try:
            pairs = json.loads(journal.read_text())
            for tmp, final in pairs:
                if os.path.exists(tmp):
                    os.replace(tmp, final)
                    done.append(Path(final))
            journal.unlink()
        except (OSError, ValueError, TypeError):
            pass
    return done


def _temp_for(path: Path, suffix: str | None) -> Path:
    folder = path.parent if str(path.parent) else Path(".")
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.",
                                    suffix=suffix if suffix.startswith(".tmp") else f".part{suffix}", dir=folder)
    os.close(fd)
    return Path(tmp_name)


def atomic_write(path, write: Callable[[Path], None], suffix: str | None = None,
                 check: Callable[[Path], None] | None = None, durable: bool = True) -> Path:
    """Call `write(tmp_path)` on a temporary file in the target's folder, then rename it over `path`.

    `check(tmp_path)`, when given, runs before the rename and may raise to abandon the write.

    The temporary name keeps the target's suffixes (".nii.gz" stays ".nii.gz") so writers that
    pick a format from the name still work. The file is fsynced before the rename and gets the
    mode of the file it replaces (else 0666 minus the umask). On any failure the temporary file
    is removed and the exception propagates; an existing file at `path` is left untouched.
    `durable=False` skips the fsyncs (for caches that check themselves on reading).
    """
    return atomic_write_set([(path, write, suffix, check)], durable=durable, clean_stale=False)[0]


def atomic_write_set(items: Sequence[tuple], cleanup: Iterable = (), durable: bool = True,
                     clean_stale: bool = True) -> list[Path]:
    """Write several files as a unit: each `(path, write, suffix, check)` goes to a temporary
    file beside its target, all are written, checked and fsynced, and only then renamed into
    place, so a failure (a full disk, a bad value) leaves every earlier file as it was.

    `clean_stale`: first remove the temporaries that killed runs left for these targets (and for
    the further paths in `cleanup`). Returns the paths written, in order.
    """
    paths = [Path(item[0]) for item in items]
    if clean_stale:
        targets = (*paths, *(Path(c) for c in cleanup))
        for folder in {t.parent if str(t.parent) else Path(".") for t in targets}:
            recover_interrupted_sets(folder)  # first: its temporaries are the new set, not litter
        for target in targets:
            remove_stale_temporaries(target)
    temps: list[Path] = []
    journal = None
    try:
        for item, path in zip(items, paths):
            write, suffix = item[1], (item[2] if len(item) > 2 else None)
            check = item[3] if len(item) > 3 else None
            tmp = _temp_for(path, suffix)
            temps.append(tmp)
            write(tmp)
            if check is not None:
                check(tmp)
            os.chmod(tmp, _target_mode(path))
            if durable:
                _fsync_file(tmp)
        with _signals_deferred():  # Ctrl-C or a plain kill between two renames would mix old and new files
            if len(paths) > 1 and durable:
                journal = _write_journal(paths[0].parent if str(paths[0].parent) else Path("."),
                                         list(zip(temps, paths)))
            for tmp, path in zip(temps, paths):
                os.replace(tmp, path)
            if journal is not None:
                journal.unlink()
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if journal is not None:
            journal.unlink(missing_ok=True)
        raise
    if durable:
        for folder in {p.parent if str(p.parent) else Path(".") for p in paths}:
            _fsync_dir(folder)
    return paths


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), suffix=".tmp")


def atomic_save_npy(path, array) -> Path:
    """`numpy.save` through `atomic_write` (the folder is created)."""
    import numpy as np

    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    return atomic_write(path, write, suffix=".tmp")


def atomic_torch_save(path, obj) -> Path:
    """`torch.save` through `atomic_write` (the folder is created)."""
    import torch

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), suffix=".tmp")


def json_safe(obj):
    """A copy of `obj` that `json.dumps(..., allow_nan=False)` accepts: NaN and infinities become
    None (JSON has no literal for them), numpy scalars and arrays plain numbers and lists."""
    import math

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return json_safe(obj.tolist())
    if isinstance(obj, float) or type(obj).__name__.startswith("float"):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if type(obj).__name__.startswith(("int", "uint")):
        return int(obj)
    return str(obj)


def atomic_write_json(path, obj, indent: int = 2) -> Path:
    """Strict JSON (no NaN literals, see `json_safe`), written atomically."""
    import json

    return atomic_write_text(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n")
