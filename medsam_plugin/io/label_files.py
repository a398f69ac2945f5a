"""What every label-map writer shares (NIfTI/NRRD/MHA in writers.py, DICOM SEG in dicom_seg.py): the
label array check, colours as 0-255 RGBA, and atomic writing of a set of files. A leaf module, so the
writers do not import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import atomic_write_set
from .errors import LabelWriteError
from .formats import LABEL_SUFFIXES, as_label_array, matching_suffix
from .volume import Volume


# -- colours --------------------------------------------------------------------------------
def _rgba255(color) -> tuple[int, int, int, int]:
    """(r, g, b[, a]) as 0-255 ints, or as floats in [0, 1] -> (r, g, b, a) 0-255 ints."""
    c = [float(v) for v in color]
    if len(c) not in (3, 4):
        raise ValueError(f"A colour needs 3 or 4 components (r, g, b[, a]); got {color!r}.")
    if any(isinstance(v, (float, np.floating)) for v in color) and all(0.0 <= v <= 1.0 for v in c):
        c = [v * 255.0 for v in c]
    if len(c) == 3:
        c.append(255.0)
    if any(v < 0 or v > 255 for v in c):
        raise ValueError(f"Colour components must lie in 0-255 (or 0-1 floats); got {color!r}.")
    return tuple(int(round(v)) for v in c)  # type: ignore[return-value]


# -- atomic file helper ---------------------------------------------------------------------
def _temp_suffix(final: Path) -> str:
    return f".tmp{matching_suffix(final, LABEL_SUFFIXES) or ''.join(final.suffixes[-1:])}"


def _atomic_write(final: Path, write_fn: Callable[[Path], None], check_fn: Callable[[Path], None] | None = None) -> None:
    """`atomic_write` with the label writers' suffix rule and check, failing as LabelWriteError."""
    write_planned([(Path(final), write_fn, check_fn)])


# Longest file name written (most file systems allow 255 bytes; the temporary name adds ~30).
MAX_FILE_NAME_BYTES = 200


def write_planned(items) -> list[Path]:
    """Write planned files `(path, write(tmp), check(tmp) or None)` as one unit (`atomic_write_set`):
    all or none of them replace what was there. Fails as LabelWriteError naming what was not written."""
    items = [(Path(p), w, c) for p, w, c in items]
    for final, _, _ in items:
        if len(final.name.encode("utf-8", "surrogateescape")) > MAX_FILE_NAME_BYTES:
            raise LabelWriteError(f"Cannot write '{final}': the file name is longer than {MAX_FILE_NAME_BYTES} "
                                  f"bytes. Choose a shorter name. Nothing was written.")
    try:
        for final, _, _ in items:
            final.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_set([(final, w, _temp_suffix(final), c) for final, w, c in items])
    except LabelWriteError:
        raise
    except Exception as exc:
        names = ", ".join(f"'{final}'" for final, _, _ in items)
        raise LabelWriteError(
            f"Could not write {names} ({type(exc).__name__}: {exc}). None of these files was written or "
            f"changed; check that the folder exists and is writable and that the disk has free space, or "
            f"choose another output path."
        ) from exc


# -- the label array ----------------------------------------------------------------------
def _prepare_labels(labels_ijk: np.ndarray, reference: Volume) -> np.ndarray:
    labels = np.asarray(labels_ijk)
    if labels.shape != reference.shape:
        raise LabelWriteError(
            f"The label volume has shape {labels.shape} but the image '{reference.source_path}' has "
            f"shape {reference.shape}: labels must be on the image's stored (i, j, k) grid "
            f"(use SliceView.from_view to map a view-frame mask back). Nothing was written."
        )

    def fail(kind: str, value) -> LabelWriteError:
        if kind == "non_integer":
            return LabelWriteError("The label volume holds non-integer values; label ids must be integers. "
                                   "Nothing was written.")
        if kind == "not_numeric":
            return LabelWriteError(f"The label volume has type {value}; label ids must be integers. Nothing was written.")
        if kind == "negative":
            return LabelWriteError(f"The label volume holds negative ids (min {value}); ids must be 0 or positive. "
                                   f"Nothing was written.")
        return LabelWriteError(f"Label id {int(value)} exceeds 65535, the largest id a label map can hold. "
                               f"Nothing was written.")

    return as_label_array(labels, fail, copy=False)
