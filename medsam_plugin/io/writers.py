"""Writing label maps in the source image's voxel grid, atomically, with colour/name sidecars.

The label volume is always written on the reference image's stored (i, j, k) grid with the
reference affine: no reorientation or resampling, so an oblique source stays oblique.

- NIfTI (.nii, .nii.gz): the source NIfTI header is copied (units, descrip, qform/sform codes),
  the datatype becomes uint8 (uint16 once a label id exceeds 254), scl_slope/scl_inter are
  reset so stored values are the label ids exactly, and sform/qform are both set to the affine.
- NRRD (.nrrd) and MetaImage (.mha) through SimpleITK, with the reference geometry in LPS.
  (Detached-header formats .nhdr/.mhd are refused: their data file name cannot be written
  atomically.)

Atomic: each file goes to a hidden temporary file in the same folder, is checked (reloaded
affine vs the reference), then moved into place with `os.replace`. On any failure the temporary
file is removed and `LabelWriteError` is raised; an existing output is left untouched.

Sidecars next to `<stem>.nii.gz`: `<stem>.labels.json`, `<stem>.itksnap.txt` (ITK-SNAP label
description) and `<stem>.ctbl` (3D Slicer colour table).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .errors import LabelWriteError
from .geometry import lps_to_ras_affine, ras_to_lps_geometry
from .label_files import MAX_FILE_NAME_BYTES, _atomic_write, _prepare_labels, _rgba255, write_planned  # noqa: F401
from .colors import default_label_color, default_palette  # noqa: F401  (re-exported)
from .formats import (  # noqa: F401  (LABEL_SUFFIXES and label_dtype_for re-exported)
    DETACHED_HEADER_SUFFIXES,
    LABEL_FORMATS,
    LABEL_SUFFIXES,
    label_dtype_for,
    matching_suffix,
    strip_suffix,
)
from .volume import Volume

__all__ = [
    "LabelWriteError",
    "write_label_map",
    "write_label_maps_per_object",
    "label_dtype_for",
    "default_label_color",
    "default_palette",
    "sidecar_paths",
    "label_file_stem",
    "LABEL_SUFFIXES",
]

_AFFINE_ATOL_MM = 1e-4

# -- naming helpers -------------------------------------------------------------------------
def label_file_stem(path: str | os.PathLike) -> str:
    """File name without the image suffix: 'seg.nii.gz' -> 'seg'."""
    return strip_suffix(path, (*LABEL_SUFFIXES, *DETACHED_HEADER_SUFFIXES), stem=True)


def sidecar_paths(path: str | os.PathLike) -> dict[str, Path]:
    """{"json", "itksnap", "ctbl"} paths written next to a label map."""
    p = Path(path)
    stem = label_file_stem(p)
    return {
        "json": p.with_name(f"{stem}.labels.json"),
        "itksnap": p.with_name(f"{stem}.itksnap.txt"),
        "ctbl": p.with_name(f"{stem}.ctbl"),
    }


# -- main writer ----------------------------------------------------------------------------
def _label_format(path: Path) -> str:
    suffix = matching_suffix(path, LABEL_SUFFIXES)
    if suffix:
        return LABEL_FORMATS[suffix]
    raise LabelWriteError(
        f"Cannot write a label map to '{path}': use a .nii.gz, .nii, .nrrd or .mha file name, or .dcm for a "
        f"DICOM SEG of a DICOM series (detached .nhdr/.mhd headers are not supported)."
    )


def _nifti_image(labels: np.ndarray, reference: Volume):
    import nibabel as nib

    src = reference.header
    affine = reference.affine_ras
    if isinstance(src, nib.Nifti2Header):
        cls, hdr = nib.Nifti2Image, src.copy()
    elif isinstance(src, nib.Nifti1Header):
        cls, hdr = nib.Nifti1Image, src.copy()
    else:
        cls, hdr = nib.Nifti1Image, None
    sform_code = int(hdr["sform_code"]) if hdr is not None else 0
    qform_code = int(hdr["qform_code"]) if hdr is not None else 0
    img = cls(labels, affine, header=hdr)
    h = img.header
    h.set_data_dtype(labels.dtype)
    h.set_slope_inter(1.0, 0.0)
    h["cal_min"], h["cal_max"] = 0, 0
    h.set_intent("label")
    h["descrip"] = b"medsam_plugin label map"
    # Keep the source's codes (1 scanner, 2 aligned, ...); default to "scanner" when unset.
    s_code = sform_code or qform_code or 1
    q_code = qform_code or s_code
    img.set_sform(affine, code=s_code)
    img.set_qform(affine, code=q_code)
    return img


def _sitk_image(labels: np.ndarray, reference: Volume):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)))  # ijk -> zyx
    origin, spacing, direction = ras_to_lps_geometry(reference.affine_ras)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    return img


def _check_written(tmp: Path, fmt: str, reference: Volume, dtype: np.dtype) -> None:
    if fmt == "nifti":
        import nibabel as nib

        img = nib.load(str(tmp))
        affine, shape, disk_dtype = img.affine, img.shape, img.get_data_dtype()
    else:
        import SimpleITK as sitk

        r = sitk.ImageFileReader()
        r.SetFileName(str(tmp))
        r.ReadImageInformation()
        affine = lps_to_ras_affine(r.GetOrigin(), r.GetSpacing(), r.GetDirection())
        shape = tuple(r.GetSize())
        pixel_ids = {sitk.sitkUInt8: np.uint8, sitk.sitkUInt16: np.uint16}
        disk_dtype = np.dtype(pixel_ids.get(r.GetPixelID(), np.float64))
    if tuple(shape) != reference.shape:
        raise LabelWriteError(f"Round-trip check failed: the written file has shape {shape}, expected {reference.shape}.")
    if not np.allclose(affine, reference.affine_ras, atol=_AFFINE_ATOL_MM, rtol=1e-6):
        raise LabelWriteError(
            "Round-trip check failed: the written file's affine differs from the source image's affine "
            f"(max difference {float(np.max(np.abs(affine - reference.affine_ras))):.3g} mm). Nothing was written."
        )
    if np.dtype(disk_dtype) != dtype:
        raise LabelWriteError(f"Round-trip check failed: the written file stores {disk_dtype}, expected {dtype}.")


def write_label_map(
    path: str | os.PathLike,
    labels_ijk: np.ndarray,
    reference: Volume,
    names: Mapping[int, str] | None = None,
    colors: Mapping[int, tuple] | None = None,
    *,
    sidecars: bool = True,
    model_name: str | None = None,
) -> Path:
    """Write a label volume on the reference image's grid, atomically, plus sidecar files.

    A `.dcm` path writes a DICOM SEG instead (`io.dicom_seg.write_dicom_seg`; the reference must be
    a DICOM series; names and colours travel inside the SEG, so no sidecars; `model_name` goes
    into its algorithm identification).

    Args:
        path: output file, .nii.gz / .nii (NIfTI, source header copied) or .nrrd / .mha.
        labels_ijk: (I, J, K) integer (or bool) array on `reference.data_ijk`'s stored grid;
            0 is background. Stored as uint8, or uint16 once an id exceeds 254.
        reference: the image the labels belong to (its affine and header are reused).
        names: {label id: name}; ids without a name get "label <id>".
        colors: {label id: (r, g, b[, a])} 0-255 ints (or 0-1 floats); default `default_label_color`.
        sidecars: also write `<stem>.labels.json`, `<stem>.itksnap.txt` and `<stem>.ctbl`.

    Returns:
        The label map path. Sidecar paths: `sidecar_paths(path)`.

    Raises:
        LabelWriteError: wrong shape/values, unsupported extension, or any I/O failure; no partial
            or temporary file is left behind, and an existing output is left unchanged.
    """
    path = Path(path).expanduser()
    from .dicom_seg import is_dicom_seg_path

    if is_dicom_seg_path(path):
        from .dicom_seg import write_dicom_seg

        return write_dicom_seg(path, labels_ijk, reference, names, colors, model_name=model_name)
    write_planned(plan_label_map(path, labels_ijk, reference, names, colors, sidecars=sidecars))
    return path


def plan_label_map(path, labels_ijk: np.ndarray, reference: Volume, names=None, colors=None, *,
                   sidecars: bool = True) -> list[tuple]:
    """The files `write_label_map` writes, as `(path, write(tmp), check(tmp))` for `write_planned`
    (so a caller can write several label maps and their sidecars as one unit)."""
    path = Path(path).expanduser()
    fmt = _label_format(path)
    labels = _prepare_labels(labels_ijk, reference)

    if fmt == "nifti":
        import nibabel as nib

        img = _nifti_image(labels, reference)

        def write(tmp: Path) -> None:
            nib.save(img, str(tmp))

    else:
        import SimpleITK as sitk

        img = _sitk_image(labels, reference)

        def write(tmp: Path) -> None:
            sitk.WriteImage(img, str(tmp), True)

    items = [(path, write, lambda tmp: _check_written(tmp, fmt, reference, labels.dtype))]
    if sidecars:
        ids = sorted(set(int(i) for i in np.unique(labels) if i != 0) | set(int(i) for i in (names or {}) if int(i) != 0))
        items += _sidecar_items(path, ids, reference, names, colors)
    return items


def _label_table(ids: Iterable[int], names, colors) -> list[dict]:
    names = {int(k): str(v) for k, v in (names or {}).items()}
    colors = {int(k): v for k, v in (colors or {}).items()}
    table = []
    for i in ids:
        rgba = _rgba255(colors[i]) if i in colors else (*default_label_color(i), 255)
        table.append({"id": int(i), "name": names.get(i, f"label {i}"), "color": list(rgba)})
    return table


def write_label_sidecars(
    path: str | os.PathLike,
    label_ids: Iterable[int],
    reference: Volume | None = None,
    names: Mapping[int, str] | None = None,
    colors: Mapping[int, tuple] | None = None,
) -> dict[str, Path]:
    """Write the JSON, ITK-SNAP and Slicer colour-table sidecars of a label map (atomically)."""
    write_planned(_sidecar_items(path, label_ids, reference, names, colors))
    return sidecar_paths(path)


def _itksnap_label(name: str) -> str:
    """A name as ITK-SNAP reads it: one line, no double quote (it ends the field), no control characters."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", name).replace('"', "'").strip() or "label"


def _slicer_name(name: str, label_id: int) -> str:
    """A colour-table name: one token (the file is space-separated), no control characters."""
    return re.sub(r"[\s\x00-\x1f\x7f]+", "_", name.strip()) or f"label_{label_id}"


def _sidecar_items(path, label_ids, reference, names, colors) -> list[tuple]:
    path = Path(path)
    table = _label_table(sorted(set(int(i) for i in label_ids) - {0}), names, colors)
    out = sidecar_paths(path)

    meta = {
        "format": "medsam_plugin.labels/1",
        "label_map": path.name,
        "labels": table,
        "source_image": str(Path(reference.source_path).resolve()) if reference is not None and reference.source_path else None,
        "affine": reference.affine_ras.tolist() if reference is not None else None,
        "shape": list(reference.shape) if reference is not None else None,
    }
    json_text = json.dumps(meta, indent=2) + "\n"

    snap = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# (written by medsam_plugin)",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "#  IDX: label id; R, G, B: 0-255; A: opacity 0-1; VIS, MSH: visible in slices / in 3D (0|1)",
        "################################################",
        f'{0:5d} {0:5d} {0:4d} {0:4d} {0.0:8.2f} {0:2d} {0:2d}    "Clear Label"',
    ]
    for e in table:
        r, g, b, a = e["color"]
        label = _itksnap_label(e["name"])
        snap.append(f'{e["id"]:5d} {r:5d} {g:4d} {b:4d} {a / 255:8.2f} {1:2d} {1:2d}    "{label}"')
    snap_text = "\n".join(snap) + "\n"

    ctbl = [f"# Color table file {out['ctbl'].name}", f"# {len(table) + 1} values", "0 background 0 0 0 0"]
    for e in table:
        r, g, b, a = e["color"]
        slicer_name = _slicer_name(e["name"], e["id"])
        ctbl.append(f"{e['id']} {slicer_name} {r} {g} {b} {a}")
    ctbl_text = "\n".join(ctbl) + "\n"

    return [(out[key], (lambda tmp, t=text: tmp.write_text(t, encoding="utf-8")), None)
            for key, text in (("json", json_text), ("itksnap", snap_text), ("ctbl", ctbl_text))]


def _safe_name(name: str, max_len: int = 64) -> str:
    """A file-name part from an object name: safe characters only, at most `max_len` of them."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")[:max_len].rstrip("._")
    return s or "object"


def write_label_maps_per_object(
    folder: str | os.PathLike,
    labels_ijk: np.ndarray,
    reference: Volume,
    names: Mapping[int, str] | None = None,
    colors: Mapping[int, tuple] | None = None,
    *,
    suffix: str = ".nii.gz",
    ids: Iterable[int] | None = None,
) -> dict[int, Path]:
    """Write one binary (0/1 uint8) file per object: `<folder>/<id:03d>_<name><suffix>`.

    Args:
        labels_ijk: (I, J, K) multi-object label volume on the reference's stored grid.
        ids: which label ids to write (default: every non-zero id present, plus named ids).
    Returns:
        {label id: path}. All files and their sidecars are written as one unit.
    """
    plan = plan_label_maps_per_object(folder, labels_ijk, reference, names, colors, suffix=suffix, ids=ids)
    write_planned([item for items in plan.values() for item in items])
    return {i: Path(items[0][0]) for i, items in plan.items()}


def plan_label_maps_per_object(folder, labels_ijk, reference, names=None, colors=None, *, suffix=".nii.gz",
                               ids=None) -> dict[int, list[tuple]]:
    """{label id: the planned files (see `plan_label_map`) of its binary label map}."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise LabelWriteError(f"Cannot write the per-object label maps into '{folder}': it is a file, not a "
                              f"folder. Choose a folder. Nothing was written.")
    labels = _prepare_labels(labels_ijk, reference)
    if ids is None:
        present = set(int(i) for i in np.unique(labels)) - {0}
        ids = sorted(present | {int(i) for i in (names or {})} - {0})
    names = {int(k): str(v) for k, v in (names or {}).items()}
    colors = {int(k): v for k, v in (colors or {}).items()}
    planned: dict[int, list[tuple]] = {}
    for i in ids:
        i = int(i)
        name = names.get(i, f"label {i}")
        out = folder / f"{i:03d}_{_safe_name(name)}{suffix}"
        mask = (labels == i).astype(np.uint8)
        planned[i] = plan_label_map(out, mask, reference, names={1: name},
                                    colors={1: colors[i]} if i in colors else {1: default_label_color(i)})
    return planned

