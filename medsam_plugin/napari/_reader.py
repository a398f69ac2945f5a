"""napari reader: CT/MRI volumes shown in the engine's radiological view with physical geometry.

The layer data is `SliceView.to_view(volume.data_ijk)`, shape (n_slices, rows, cols): for the
default axial view the slider walks inferior -> superior and each slice is shown in radiological
orientation (patient right on the screen's left). The layer's scale/translate (or affine, for
oblique scans) come from `SliceView.display_affine`, so napari measures in millimetres. The
source `Volume` and the view axis travel in `layer.metadata` (keys in `META_*`), which is how the
widget builds its session and how the writer puts label maps back on the source voxel grid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

META_VOLUME = "medsam_volume"  # the source io.Volume (array as stored, affine, header)
META_AXIS = "medsam_axis"  # the SliceView axis the layer shows ("axial", ...)
META_SOURCE = "medsam_source_path"  # str path of the scan (file or DICOM folder)
META_NAMES = "medsam_label_names"  # {label id: name} (Labels layers)
META_COLORS = "medsam_label_colors"  # {label id: (r, g, b) 0-255} (Labels layers)

_FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")

# Display windows (level, width) in HU for CT layers; the widget offers the same presets.
DEFAULT_CT_WINDOW = (40.0, 400.0)


def _is_dicom_file(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _looks_readable(path: str) -> bool:
    """Cheap check (no pixel data read) that `path` is something `read_volume` handles."""
    p = Path(path)
    if p.is_dir():
        try:
            entries = sorted(p.iterdir())[:64]
        except OSError:
            return False
        files = [e for e in entries if e.is_file()]
        return any(e.name.lower().endswith(".dcm") or _is_dicom_file(e) for e in files)
    name = p.name.lower()
    return p.is_file() and name.endswith(_FILE_SUFFIXES)


def napari_get_reader(path) -> Callable | None:
    """Return a reader for one CT/MRI file or DICOM folder, or None when it is not one."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = os.fspath(path)
    if not _looks_readable(path):
        return None
    return read_scan


def layer_geometry(view) -> dict[str, Any]:
    """napari transform kwargs that show a `SliceView` array with physical geometry.

    Returns {"scale", "translate"} for axis-aligned scans (display_affine is diagonal) or
    {"affine"} for oblique ones. Prompt and label layers reuse the same kwargs so that one
    data coordinate means the same voxel in all of them.
    """
    aff = np.asarray(view.display_affine, dtype=np.float64)
    lin = aff[:3, :3]
    if np.allclose(lin, np.diag(np.diag(lin)), atol=1e-6) and np.all(np.diag(lin) > 0):
        return {"scale": tuple(float(s) for s in np.diag(lin)), "translate": tuple(float(t) for t in aff[:3, 3])}
    return {"affine": aff}


def image_layer_data(volume, axis: str = "axial", name: str | None = None) -> tuple:
    """(data_zyx, kwargs, "image") for a `Volume`, in the engine's view frame."""
    from ..io import SliceView

    view = SliceView(volume, axis=axis)
    data_zyx = view.to_view(volume.data_ijk)
    kwargs: dict[str, Any] = dict(layer_geometry(view))
    src = volume.source_path
    kwargs["name"] = name or (_scan_name(src) if src is not None else "scan")
    kwargs["metadata"] = {META_VOLUME: volume, META_AXIS: axis, META_SOURCE: str(src) if src else None}
    kwargs["colormap"] = "gray"
    if volume.modality == "CT":
        level, width = DEFAULT_CT_WINDOW
        kwargs["contrast_limits"] = (level - width / 2.0, level + width / 2.0)
    else:
        finite = np.asarray(data_zyx[:: max(1, data_zyx.shape[0] // 16)], dtype=np.float64)
        lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
        kwargs["contrast_limits"] = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    return data_zyx, kwargs, "image"


def _scan_name(src) -> str:
    name = Path(src).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_scan(path) -> list[tuple]:
    """Read one scan into a napari image layer (axial view, mm geometry, source in metadata)."""
    from ..io import read_volume

    if isinstance(path, (list, tuple)):
        path = path[0]
    volume = read_volume(path)
    data, kwargs, kind = image_layer_data(volume)
    if volume.source_path is not None and volume.source_path.name.lower().endswith((".nii", ".nii.gz")):
        # "image.nii.gz" in a case folder: name the layer after the folder, which says more.
        if kwargs["name"] in ("image", "img", "ct", "mri", "t1", "t2"):
            kwargs["name"] = f"{volume.source_path.parent.name}/{kwargs['name']}"
    return [(data, kwargs, kind)]
