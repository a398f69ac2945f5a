"""napari writer: a Labels layer -> a label map on the source scan's voxel grid (+ sidecars).

When the layer carries the source `Volume` (layers made by the widget, or label layers opened
next to a scan read by this plugin), the view-frame array goes back through
`SliceView.from_view` and `io.write_label_map` writes it with the source affine and header,
atomically, with `<stem>.labels.json`, `<stem>.itksnap.txt` and `<stem>.ctbl` beside it.

A Labels layer without that metadata (for example one made with napari's "new labels" button)
is written on its own grid: its napari transform is read as the axial display frame used by the
reader (superior, posterior, left in mm), which is exact for layers drawn over a scan opened
with this plugin.

A `.dcm` file name writes a DICOM SEG (`io.dicom_seg.write_dicom_seg`): the layer must carry a
source `Volume` read from a DICOM series; the model named in `metadata[META_MODEL]`, when set,
goes into the SEG's algorithm identification.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..io.formats import DEFAULT_LABEL_SUFFIX, LABEL_OUTPUT_SUFFIXES, has_suffix
from ._reader import META_AXIS, META_COLORS, META_MODEL, META_NAMES, META_TRUE_AFFINE, META_VOLUME


def _with_extension(path: str) -> str:
    """The path, with ".nii.gz" added unless it names a label map format (".dcm": a DICOM SEG that
    references the layer's source DICOM series)."""
    if has_suffix(path, LABEL_OUTPUT_SUFFIXES):
        return path
    return path + DEFAULT_LABEL_SUFFIX


def _data_to_world(meta: dict) -> np.ndarray:
    """4x4 napari data -> world matrix from the layer's scale/translate/affine (no rotate/shear)."""
    ndim = 3
    scale = np.asarray(meta.get("scale", np.ones(ndim)), dtype=np.float64)[-ndim:]
    translate = np.asarray(meta.get("translate", np.zeros(ndim)), dtype=np.float64)[-ndim:]
    st = np.eye(4)
    st[:3, :3] = np.diag(scale)
    st[:3, 3] = translate
    affine = meta.get("affine")
    if affine is not None:
        a = np.asarray(getattr(affine, "affine_matrix", affine), dtype=np.float64)
        a = a[-(ndim + 1):, -(ndim + 1):]
        st = a @ st
    return st


def labels_for_source(data_zyx: np.ndarray, meta: dict):
    """(labels_ijk, reference Volume) for a Labels layer's view-frame array and napari meta."""
    from ..io import SliceView, Volume

    md = meta.get("metadata") or {}
    data_zyx = np.asarray(data_zyx)
    if data_zyx.ndim != 3:
        raise ValueError(
            f"The Labels layer has {data_zyx.ndim} dimensions; a label map must be 3D (slices, rows, cols). "
            "Save a 3D Labels layer made over a CT/MRI scan."
        )
    volume = md.get(META_VOLUME)
    if volume is not None:
        view = SliceView(volume, axis=md.get(META_AXIS, "axial"))
        if tuple(data_zyx.shape) != tuple(view.view_shape):
            raise ValueError(
                f"The Labels layer has shape {data_zyx.shape} but its scan's view has shape {view.view_shape}; "
                "the layer no longer matches the scan. Create the labels again over the scan."
            )
        return view.from_view(data_zyx), volume
    # No source scan: the layer's own transform, read as the reader's axial display frame.
    from ..io.orientation import SliceView as _SV

    ras_to_display = _SV(np.eye(4), shape=(2, 2, 2), axis="axial").ras_to_display
    # The true affine kept in the metadata wins over the (deobliqued) display transform.
    true_affine = md.get(META_TRUE_AFFINE)
    data_to_world = np.asarray(true_affine, dtype=np.float64) if true_affine is not None else _data_to_world(meta)
    affine_ras = np.linalg.inv(ras_to_display) @ data_to_world
    return data_zyx, Volume(data_ijk=data_zyx, affine_ras=affine_ras)


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer for Labels layers; returns the paths written."""
    from ..io import write_label_map
    from ..io.colors import default_label_color

    path = _with_extension(os.fspath(path))
    labels_ijk, reference = labels_for_source(data, meta)
    md = meta.get("metadata") or {}
    ids = [int(i) for i in np.unique(labels_ijk) if i]
    names = {int(k): str(v) for k, v in (md.get(META_NAMES) or {}).items()}
    colors = {int(k): tuple(v) for k, v in (md.get(META_COLORS) or {}).items()}
    for i in ids:
        names.setdefault(i, f"label {i}")
        colors.setdefault(i, default_label_color(i))
    from ..io.dicom_seg import is_dicom_seg_path

    if is_dicom_seg_path(path):
        from ..io.dicom_seg import DicomSegWriteError, write_dicom_seg

        if md.get(META_VOLUME) is None:
            raise DicomSegWriteError(
                f"Cannot save '{path}' as a DICOM SEG: this Labels layer is not linked to a DICOM series (it was "
                f"not made over a scan opened with this plugin). Open the DICOM series folder, segment over it, and "
                f"save again; or save as .nii.gz."
            )
        return [str(write_dicom_seg(path, labels_ijk, reference, names=names, colors=colors,
                                    model_name=md.get(META_MODEL)))]
    written = write_label_map(path, labels_ijk, reference, names=names, colors=colors)
    from ..io import sidecar_paths

    return [str(written), *[str(p) for p in sidecar_paths(written).values() if Path(p).exists()]]
