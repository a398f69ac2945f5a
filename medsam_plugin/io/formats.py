"""What the files are: the one home of the file-name suffixes and of the label map's stored values.

Suffixes are matched case-insensitively and longest first, so a compound suffix such as
".nii.gz" or ".gipl.gz" is recognised whole (`matching_suffix`) and stripped whole (`strip_suffix`).

Label maps hold integer ids 0..65535, 0 being background; they are stored as uint8 while every
id is at most 254, as uint16 above (`label_dtype_for`), never as int64 (docs/ARCHITECTURE.md).
`as_label_array` is the one check of a label array's values, shared by the reader and the writers.

No torch, napari or Qt here (the napari reader/writer and the widget import it at start-up).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

__all__ = [
    "NIFTI_SUFFIXES",
    "SITK_SUFFIXES",
    "IMAGE_SUFFIXES",
    "SCAN_SUFFIXES",
    "DETACHED_HEADER_SUFFIXES",
    "LABEL_FORMATS",
    "LABEL_SUFFIXES",
    "DICOM_SUFFIX",
    "DICOM_SEG_SUFFIX",
    "LABEL_OUTPUT_SUFFIXES",
    "DEFAULT_LABEL_SUFFIX",
    "matching_suffix",
    "has_suffix",
    "strip_suffix",
    "MAX_UINT8_LABEL",
    "MAX_LABEL",
    "label_dtype_for",
    "as_label_array",
]

# -- images (read_volume) -----------------------------------------------------------------------
DICOM_SUFFIX = ".dcm"  # one DICOM file (a slice of a series, or a DICOM SEG)
NIFTI_SUFFIXES = (".nii.gz", ".nii")  # read with nibabel
# Suffix -> source_format for the files SimpleITK reads.
SITK_SUFFIXES: dict[str, str] = {
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "mha",
    ".mhd": "mha",
    DICOM_SUFFIX: "dicom",
    ".vtk": "vtk",
    ".gipl": "gipl",
    ".gipl.gz": "gipl",
    ".hdr": "analyze",
    ".img": "analyze",
    ".mnc": "minc",
    ".tif": "tiff",
    ".tiff": "tiff",
}
IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, *SITK_SUFFIXES)  # every file `read_volume` reads
# The 3D scan formats the napari reader claims by name (the other IMAGE_SUFFIXES, .tif or .vtk,
# are left to napari's own readers), and the ones a scan's layer name is cut from.
SCAN_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr", ".mha", ".mhd", DICOM_SUFFIX)
DETACHED_HEADER_SUFFIXES = (".nhdr", ".mhd")  # a header whose voxels are in a second file

# -- label maps (write_label_map) ---------------------------------------------------------------
LABEL_FORMATS: dict[str, str] = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "mha"}
LABEL_SUFFIXES = tuple(LABEL_FORMATS)  # label map files written (detached headers are refused)
DICOM_SEG_SUFFIX = DICOM_SUFFIX  # a label map written as a DICOM SEG of the source series
LABEL_OUTPUT_SUFFIXES = (*LABEL_SUFFIXES, DICOM_SEG_SUFFIX)
DEFAULT_LABEL_SUFFIX = ".nii.gz"


def _name(path: str | os.PathLike) -> str:
    return Path(os.fspath(path)).name


def matching_suffix(path: str | os.PathLike, suffixes: Iterable[str]) -> str:
    """The longest of `suffixes` that the file name of `path` ends with (any case); "" when none does.

    matching_suffix("CT.NII.GZ", NIFTI_SUFFIXES) -> ".nii.gz" (not ".gz", not ".nii").
    """
    name = _name(path).lower()
    return next((s for s in sorted(suffixes, key=len, reverse=True) if name.endswith(s.lower())), "")


def has_suffix(path: str | os.PathLike, suffixes: Iterable[str]) -> bool:
    """Whether the file name of `path` ends with one of `suffixes` (any case)."""
    return bool(matching_suffix(path, suffixes))


def strip_suffix(path: str | os.PathLike, suffixes: Iterable[str] = IMAGE_SUFFIXES, *, stem: bool = False) -> str:
    """The file name of `path` without the longest of `suffixes` it ends with: "seg.nii.gz" -> "seg".

    A name with none of them is returned whole, or, with `stem`, without its last suffix only.
    """
    name = _name(path)
    suffix = matching_suffix(name, suffixes)
    if suffix:
        return name[: -len(suffix)]
    return Path(name).stem if stem else name


# -- label values ---------------------------------------------------------------------------------
MAX_UINT8_LABEL = 254  # the largest id stored as uint8
MAX_LABEL = int(np.iinfo(np.uint16).max)  # 65535, the largest id a label map holds


def label_dtype_for(max_label: int) -> np.dtype:
    """uint8 up to label id 254, uint16 above (docs/ARCHITECTURE.md); ValueError above 65535."""
    if max_label > MAX_LABEL:
        raise ValueError(f"Label id {max_label} exceeds {MAX_LABEL}, the largest id a label map can hold.")
    return np.dtype(np.uint8 if max_label <= MAX_UINT8_LABEL else np.uint16)


def as_label_array(data: np.ndarray, fail: Callable[[str, object], Exception], copy: bool = True) -> np.ndarray:
    """`data` as a label array (uint8, or uint16 past id 254), after the one check of its values.

    Booleans become 0/1; floats must be finite whole numbers; ids must be 0..65535. A value that
    breaks the rule raises `fail(kind, value)`, so each caller words its own sentence; kinds:
    "non_integer" (value None), "not_numeric" (the dtype), "negative" (the minimum) and
    "too_large" (the maximum).
    """
    data = np.asarray(data)
    if data.dtype == bool:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise fail("non_integer", None)
    elif not np.issubdtype(data.dtype, np.integer):
        raise fail("not_numeric", data.dtype)
    if data.size == 0:
        return data.astype(np.uint8)
    lo, hi = data.min(), data.max()
    if lo < 0:
        raise fail("negative", lo)
    if hi > MAX_LABEL:
        raise fail("too_large", hi)
    return data.astype(label_dtype_for(int(hi)), copy=copy)
