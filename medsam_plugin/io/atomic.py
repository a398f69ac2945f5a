"""Atomic file writes: write beside the target, then rename; never leave a partial file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable[[Path], None], suffix: str | None = None,
                 check: Callable[[Path], None] | None = None) -> Path:
    """Call `write(tmp_path)` on a temporary file in the target's folder, then rename it over `path`.

    `check(tmp_path)`, when given, runs before the rename and may raise to abandon the write.

    The temporary name keeps the target's suffixes (".nii.gz" stays ".nii.gz") so writers that
    pick a format from the name still work. On any failure the temporary file is removed and the
    exception propagates; an existing file at `path` is left untouched.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix if suffix.startswith(".tmp") else f".part{suffix}", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), suffix=".tmp")


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), suffix=".tmp")


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
