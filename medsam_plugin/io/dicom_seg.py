"""DICOM SEG out, and back in, for label maps made on a DICOM series (highdicom, pydicom).

A DICOM Segmentation (SEG) object is what a PACS, 3D Slicer, OHIF and MONAI Label store and show
next to the scan: it references the study, the series, every source instance (SOP Instance UID)
and their Frame of Reference, so the result goes back to where the images came from.

Frames (docs/ARCHITECTURE.md): `labels_ijk` is on the source `Volume`'s stored grid. For a DICOM
series read by `read_volume`, slice k of that grid is the k-th file of
`volume.header["dicom_files"]`, with i the column and j the row of the DICOM image. So the SEG
frame for slice k is `labels_ijk[:, :, k].T` (rows, cols), and it takes its position and
orientation from source instance k itself (no LPS/RAS conversion of voxel data is needed; the
Volume's RAS affine is only cross-checked against the instances). Because the positions come from
the instances, a series with uneven slice spacing (a missing slice) or a gantry tilt is written
exactly as acquired, even though the `Volume` affine (one spacing, no shear) only approximates it.

Segments: one per label id present, numbered 1..n in increasing label-id order (DICOM requires
consecutive segment numbers; ids 1..n, the usual case, keep their numbers). Each has its name,
its colour as a CIELab recommended display value, a segmented property category/type (guessed
from the name when it is a DICOM CID 7151 term such as "spleen", else Tissue/Tissue, as 3D Slicer
does; overridable) and the algorithm (medsam-plugin, its version, the model). Segmentation type
BINARY. Written atomically and read back before it replaces anything.

Reading (`read_dicom_seg`, and `read_labels` for a SEG file): every frame is placed on the source
slice whose SOP Instance UID it references (or, for SEGs that do not say, whose position it has),
after checking that the SEG belongs to the opened series and Frame of Reference.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from .formats import DICOM_SEG_SUFFIX, has_suffix
from .errors import ImageReadError, LabelMismatchError, LabelWriteError
from .label_files import _atomic_write, _prepare_labels, _rgba255
from .volume import Volume

__all__ = [
    "SEG_SOP_CLASS_UID",
    "DicomSegWriteError",
    "DicomSegLabels",
    "write_dicom_seg",
    "read_dicom_seg",
    "check_dicom_seg_source",
    "is_dicom_seg",
    "is_dicom_seg_path",
    "segment_property",
    "parse_property",
]

log = logging.getLogger(__name__)

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
_IOP_ATOL = 1e-4  # direction cosines
_POSITION_FRACTION = 0.05  # of a pixel / slice spacing: positions must agree this closely
_LATERALITY = {"left", "right", "l", "r", "lt", "rt", "bilateral"}
# DICOM's per-category lists of segmentation property types (CID 7191-7198), each with its
# CID 7150 category: a type found in one of them gets that category.
_TYPE_LISTS = (("cid7192", "AnatomicalStructure"), ("cid7194", "MorphologicallyAbnormalStructure"),
               ("cid7191", "Tissue"), ("cid7193", "PhysicalObject"), ("cid7197", "BodySubstance"),
               ("cid7198", "Substance"), ("cid7195", "Function"), ("cid7196", "SpatialAndRelationalConcept"))


class DicomSegWriteError(LabelWriteError):
    """A DICOM SEG could not be written for this volume; nothing was written."""


def is_dicom_seg_path(path: str | os.PathLike) -> bool:
    """True when an output file name asks for a DICOM SEG (".dcm")."""
    return has_suffix(path, (DICOM_SEG_SUFFIX,))


def is_dicom_seg(path: str | os.PathLike) -> bool:
    """True when `path` is a DICOM file whose SOP Class is Segmentation Storage (cheap: no pixels)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as fh:
            fh.seek(128)
            if fh.read(4) != b"DICM":
                return False
        import pydicom

        ds = pydicom.dcmread(str(p), stop_before_pixels=True, specific_tags=["SOPClassUID"])
        return str(getattr(ds, "SOPClassUID", "")) == SEG_SOP_CLASS_UID
    except Exception:
        return False


# -- segment codes ----------------------------------------------------------------------------
def _code(value: str, scheme: str, meaning: str):
    from pydicom.sr.coding import Code

    return Code(value, scheme, meaning)


def _lookup_type(keyword: str):
    """(category, type) for a pydicom keyword of a DICOM segmentation property type, or None."""
    from pydicom.sr.codedict import codes

    for cid, category in _TYPE_LISTS:
        types = getattr(codes, cid)
        if keyword in types.dir():
            return getattr(codes.cid7150, category), getattr(types, keyword)
    if keyword in codes.cid7151.dir():  # in the full list but in no category list
        return codes.cid7150.AnatomicalStructure, getattr(codes.cid7151, keyword)
    return None


def segment_property(name: str):
    """(category, type) codes for a segment name: a CID 7151 term when the name is one, else Tissue.

    The name must match a term exactly, once laterality words are dropped ("kidney_right" ->
    Kidney, "Spleen" -> Spleen, "neoplasm" -> Neoplasm, with its DICOM category); anything else ("liver tumor 2", "object 1") gets
    the generic Tissue/Tissue, as 3D Slicer gives a new segment: a wrong specific code in a PACS is
    worse than a generic one. Override per segment with `parse_property`.
    """
    from pydicom.sr.codedict import codes

    words = [w for w in re.split(r"[^A-Za-z]+", name) if w and w.lower() not in _LATERALITY]
    if words and not re.search(r"\d", name):
        found = _lookup_type("".join(w[:1].upper() + w[1:].lower() for w in words))
        if found is not None:
            return found
    return codes.cid7150.Tissue, codes.cid7151.Tissue


def _parse_code(text: str):
    """-> (type code, its category from the DICOM lists or None for an explicit code)."""
    text = text.strip()
    parts = text.split(":", 2)
    if len(parts) == 3 and all(p.strip() for p in parts):
        scheme, value, meaning = (p.strip() for p in parts)
        return _code(value, scheme, meaning), None
    keyword = "".join(w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z0-9]+", text) if w)
    found = _lookup_type(keyword)
    if found is None:
        raise ValueError(
            f"'{text}' is neither a DICOM CID 7151 term (e.g. Spleen, Liver, Kidney, Neoplasm) nor a code "
            f"written SCHEME:VALUE:MEANING (e.g. SCT:78961009:Spleen). Give one of those."
        )
    return found[1], found[0]


def parse_property(text: str):
    """'TYPE' or 'CATEGORY/TYPE' -> (category, type) codes.

    Each part is a CID 7151/7150 keyword ("Spleen", "Neoplasm", "AnatomicalStructure") or a code
    SCHEME:VALUE:MEANING ("SCT:108369006:Neoplasm"). With a type term alone, the category is the
    one DICOM lists it under (CID 7191-7198: Neoplasm -> Morphologically Abnormal Structure, Spleen ->
    Anatomical Structure); with an explicit type code alone, Anatomical Structure.
    """
    from pydicom.sr.codedict import codes

    if "/" in text:
        cat_text, type_text = text.split("/", 1)
        type_code, _ = _parse_code(type_text)
        cat_text = cat_text.strip()
        parts = cat_text.split(":", 2)
        if len(parts) == 3:
            cat_code = _code(parts[1].strip(), parts[0].strip(), parts[2].strip())
        else:
            keyword = "".join(w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z0-9]+", cat_text) if w)
            try:
                cat_code = getattr(codes.cid7150, keyword)
            except AttributeError:
                raise ValueError(
                    f"'{cat_text}' is not a segmentation category (DICOM CID 7150: "
                    f"{', '.join(codes.cid7150.dir())}) nor a code SCHEME:VALUE:MEANING."
                ) from None
        return cat_code, type_code
    type_code, category = _parse_code(text)
    return category or codes.cid7150.AnatomicalStructure, type_code


def _as_property(spec):
    if isinstance(spec, str):
        return parse_property(spec)
    category, type_ = spec
    return category, type_


# -- the source series ------------------------------------------------------------------------
@dataclass
class _Source:
    datasets: list  # pydicom Datasets (no pixels), in slice order k
    positions_lps: np.ndarray  # (K, 3) ImagePositionPatient of each slice
    regular: bool  # the slices lie exactly on the Volume's grid (even spacing, no tilt)
    note: str = ""


def _not_dicom_error(volume: Volume) -> DicomSegWriteError:
    src = volume.source_path or "<memory>"
    fmt = volume.source_format
    return DicomSegWriteError(
        f"Cannot write a DICOM SEG for '{src}': it was read from a {fmt.upper() if fmt != 'memory' else 'memory'} "
        f"image, not a DICOM series, and a DICOM SEG must reference the DICOM images it was drawn on. Open the "
        f"DICOM series (its folder) instead, or write a NIfTI label map (.nii.gz)."
    )


def check_dicom_seg_source(volume: Volume) -> _Source:
    """Read and check the source instances of a DICOM `Volume` (headers only); raise if a SEG cannot be made.

    Call it before any model work: it fails when the volume is not a DICOM series, when its files
    have moved or changed, or when they lack what a SEG must reference (Frame of Reference, study).
    """
    import pydicom

    header = volume.header if isinstance(volume.header, dict) else {}
    files = header.get("dicom_files")
    uids = header.get("sop_instance_uids")
    if volume.source_format != "dicom" or not files:
        raise _not_dicom_error(volume)
    n_i, n_j, n_k = volume.shape
    folder = volume.source_path
    if len(files) != n_k:
        raise DicomSegWriteError(
            f"Cannot write a DICOM SEG for '{folder}': the volume has {n_k} slices but {len(files)} source files "
            f"were recorded. Read the series again with read_volume."
        )
    datasets = []
    for k, f in enumerate(files):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:
            raise DicomSegWriteError(
                f"Cannot write a DICOM SEG: the source slice '{f}' can no longer be read ({type(exc).__name__}: "
                f"{exc}). The series was moved or changed after it was opened; open it again and save again."
            ) from exc
        if uids and str(ds.get("SOPInstanceUID", "")) != uids[k]:
            raise DicomSegWriteError(
                f"Cannot write a DICOM SEG: the file '{f}' is no longer the slice that was opened (its SOP "
                f"Instance UID changed). The series was replaced after it was opened; open it again and save again."
            )
        datasets.append(ds)

    first = datasets[0]
    for_uids = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if for_uids == {""}:
        raise DicomSegWriteError(
            f"Cannot write a DICOM SEG for '{folder}': its images have no Frame of Reference UID (0020,0052), so "
            f"a viewer could not place the segmentation on them. This happens with series rewritten by conversion "
            f"tools; export the series from the PACS or scanner again, or write a NIfTI label map (.nii.gz)."
        )
    if len(for_uids) > 1:
        raise DicomSegWriteError(
            f"Cannot write a DICOM SEG for '{folder}': its slices belong to {len(for_uids)} different Frames of "
            f"Reference, so they are not one acquisition. Check the series (or choose one with --series-uid)."
        )
    for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        if not str(first.get(tag, "")):
            raise DicomSegWriteError(
                f"Cannot write a DICOM SEG for '{folder}': its first image '{files[0]}' has no {tag}, which a SEG "
                f"must reference. Export the series from the PACS or scanner again."
            )
    for ds, f in zip(datasets, files):
        if (int(ds.Rows), int(ds.Columns)) != (n_j, n_i):
            raise DicomSegWriteError(
                f"Cannot write a DICOM SEG: the slice '{f}' has {ds.Rows} rows x {ds.Columns} columns but the volume "
                f"has {n_j} x {n_i}. Open the series again."
            )

    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if np.max(np.abs(iops - iops[0])) > _IOP_ATOL:
        bad = int(np.argmax(np.max(np.abs(iops - iops[0]), axis=1)))
        raise DicomSegWriteError(
            f"Cannot write a DICOM SEG for '{folder}': the slice orientation changes within the series (slice "
            f"'{files[bad]}' is oriented differently from the first). A SEG shares one orientation for all "
            f"frames. Split the series into parts with one orientation each, or write a NIfTI label map."
        )
    spacings = np.array([[float(v) for v in ds.PixelSpacing] for ds in datasets])
    if np.max(np.abs(spacings - spacings[0])) > 1e-4:
        raise DicomSegWriteError(
            f"Cannot write a DICOM SEG for '{folder}': the pixel spacing changes within the series. A SEG shares "
            f"one pixel spacing for all frames; write a NIfTI label map instead."
        )
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])

    # Cross-check the Volume's RAS affine against the instances: i runs along the DICOM row
    # direction (IOP[0:3]), j along the column direction (IOP[3:6]), both in LPS = diag(-1,-1,1) RAS.
    aff_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine_ras
    sp = np.asarray(volume.spacing)
    row_dir, col_dir = aff_lps[:3, 0] / sp[0], aff_lps[:3, 1] / sp[1]
    mismatch = (
        np.max(np.abs(row_dir - iops[0, :3])) > 1e-3
        or np.max(np.abs(col_dir - iops[0, 3:])) > 1e-3
        or np.max(np.abs(aff_lps[:3, 3] - positions[0])) > _POSITION_FRACTION * min(sp[0], sp[1])
        or np.max(np.abs(sp[:2] - spacings[0][::-1])) > 1e-3
    )
    if mismatch:
        raise DicomSegWriteError(
            f"Cannot write a DICOM SEG for '{folder}': the volume's geometry does not match its first DICOM "
            f"slice '{files[0]}' (position, orientation or pixel spacing differ). Open the series again with "
            f"read_volume; if this persists, please report it."
        )
    expected = aff_lps[:3, 3] + np.arange(n_k)[:, None] * aff_lps[:3, 2][None, :]
    off = np.linalg.norm(positions - expected, axis=1)
    regular = bool(np.max(off) <= _POSITION_FRACTION * sp[2])
    note = ""
    if not regular:
        steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
        normal = np.cross(iops[0, :3], iops[0, 3:])
        along = np.abs(np.diff(positions, axis=0) @ normal)  # files may run against the normal
        kind = ("slice spacing varies from %.3g to %.3g mm" % (along.min(), along.max())
                if np.ptp(along) > _POSITION_FRACTION * sp[2] else "the slices are tilted (sheared, e.g. gantry tilt)")
        note = (f"{kind}: the SEG frames take their positions from the source slices themselves, so they lie "
                f"exactly on the acquired images (step between slices {steps.min():.3g}-{steps.max():.3g} mm).")
        log.info("DICOM SEG for %s: %s", folder, note)
    return _Source(datasets=datasets, positions_lps=positions, regular=regular, note=note)


# -- writing ----------------------------------------------------------------------------------
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("medsam-plugin")
    except Exception:
        from .. import __version__

        return __version__


def write_dicom_seg(
    path: str | os.PathLike,
    labels_ijk: np.ndarray,
    reference: Volume,
    names: Mapping[int, str] | None = None,
    colors: Mapping[int, tuple] | None = None,
    *,
    properties: Mapping[int, object] | None = None,
    model_name: str | None = None,
    series_description: str = "MedSAM segmentation",
    series_number: int | None = None,
) -> Path:
    """Write a label volume as a DICOM SEG that references the source DICOM series, atomically.

    Args:
        path: the output file (.dcm).
        labels_ijk: (I, J, K) integer (or bool) array on `reference.data_ijk`'s stored grid; 0 is
            background. Each label id present becomes one segment.
        reference: the `Volume` read from the DICOM series (`read_volume(folder)`).
        names: {label id: name}; default "label <id>".
        colors: {label id: (r, g, b[, a])} 0-255 ints (or 0-1 floats); default `default_label_color`.
        properties: {label id: (category Code, type Code) or "TYPE" / "CATEGORY/TYPE" text (see
            `parse_property`)}; default `segment_property(name)`.
        model_name: the model that produced the labels, recorded in the algorithm identification.
        series_description: the SEG series' description (what a PACS lists).
        series_number: the SEG's series number (default: the source's + 1000).

    Returns:
        The path written.

    Raises:
        DicomSegWriteError: the reference is not a DICOM series, its files changed, the labels are
            empty, or the written file did not read back identically; nothing is left behind.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .colors import default_label_color

    path = Path(path).expanduser()
    labels = _prepare_labels(labels_ijk, reference)
    source = check_dicom_seg_source(reference)
    ids = [int(i) for i in np.unique(labels) if i != 0]
    if not ids:
        raise DicomSegWriteError(
            f"Cannot write the DICOM SEG '{path}': the label map is empty, and a SEG needs at least one segmented "
            f"voxel. Segment something first. Nothing was written."
        )
    names = {int(k): str(v) for k, v in (names or {}).items()}
    colors = {int(k): v for k, v in (colors or {}).items()}
    properties = {int(k): v for k, v in (properties or {}).items()}
    skipped = sorted(set(names) - set(ids) - {0})
    if skipped:
        log.info("DICOM SEG %s: objects %s have no voxels and get no segment", path, skipped)

    model = model_name or "unknown model"
    version = _version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medsam-plugin", family=codes.cid7162.ArtificialIntelligence, version=version,
        source="medsam-plugin (interactive MedSAM segmentation)", parameters={"model": model})
    descriptions = []
    for number, label_id in enumerate(ids, start=1):
        name = names.get(label_id, f"label {label_id}")
        category, type_ = _as_property(properties[label_id]) if label_id in properties else segment_property(name)
        r, g, b, _ = _rgba255(colors[label_id]) if label_id in colors else (*default_label_color(label_id), 255)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=type_, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm, display_color=hd.color.CIELabColor.from_rgb(r, g, b)))

    # Segment numbers 1..n for the label ids present, then (I, J, K) -> (K, rows=J, cols=I) frames.
    lut = np.zeros(int(labels.max()) + 1, dtype=np.uint8 if len(ids) <= 255 else np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1)
    frames_krc = np.ascontiguousarray(lut[labels].transpose(2, 1, 0))

    src_number = source.datasets[0].get("SeriesNumber")
    if series_number is None:
        series_number = (int(src_number) if src_number not in (None, "") else 0) + 1000
    try:
        seg = hd.seg.Segmentation(
            source_images=source.datasets,  # plane positions come from each source instance
            pixel_array=frames_krc,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medsam-plugin",
            manufacturer_model_name="medsam-plugin",
            software_versions=version,
            device_serial_number="0",
            content_label="MEDSAM",
            content_description=f"Interactive segmentation with {model}"[:64],
            series_description=series_description[:64],
        )
    except Exception as exc:
        raise DicomSegWriteError(
            f"Cannot write the DICOM SEG '{path}': highdicom refused the source series '{reference.source_path}' "
            f"({type(exc).__name__}: {exc}). Nothing was written; write a NIfTI label map (.nii.gz) instead."
        ) from exc

    def write(tmp: Path) -> None:
        seg.save_as(str(tmp))

    def check(tmp: Path) -> None:
        back = read_dicom_seg(tmp, reference)
        expected = np.zeros(labels.shape, dtype=back.labels_ijk.dtype)
        expected[...] = lut[labels]
        if not np.array_equal(back.labels_ijk, expected):
            n = int(np.count_nonzero(back.labels_ijk != expected))
            raise DicomSegWriteError(
                f"Cannot write the DICOM SEG '{path}': it did not read back identically ({n} voxels differ). "
                f"Nothing was written; please report this with the series."
            )

    _atomic_write(path, write, check)
    return path


# -- reading ----------------------------------------------------------------------------------
@dataclass
class DicomSegLabels:
    """A DICOM SEG placed on its source `Volume`'s grid.

    Attributes:
        labels_ijk: (I, J, K) uint8 (uint16 past 254 segments) on the reference's stored grid;
            the value is the segment number (where segments overlap, the lower number wins).
        names: {segment number: segment label}.
        colors: {segment number: (r, g, b) 0-255} from the recommended display CIELab value.
        properties: {segment number: (category meaning, type meaning)}.
        n_frames: number of frames in the SEG.
        referenced_sop_instance_uids: the source instances the frames reference.
    """

    labels_ijk: np.ndarray
    names: dict = field(default_factory=dict)
    colors: dict = field(default_factory=dict)
    properties: dict = field(default_factory=dict)
    n_frames: int = 0
    referenced_sop_instance_uids: list = field(default_factory=list)
    series_instance_uid: str = ""


def _frame_item(pffg, name):
    seq = getattr(pffg, name, None)
    return seq[0] if seq else None


def read_dicom_seg(path: str | os.PathLike, reference: Volume) -> DicomSegLabels:
    """Read a DICOM SEG and place it on the grid of the DICOM series it was made from.

    Args:
        path: the SEG file.
        reference: the `Volume` of the source series (`read_volume(folder)`).

    Raises:
        ImageReadError: the file is not a readable DICOM SEG.
        LabelMismatchError: the SEG references another series or Frame of Reference than `reference`,
            or instances that `reference` does not hold, or its frames are not on its slices.
    """
    import highdicom as hd

    p = Path(path)
    try:
        seg = hd.seg.segread(str(p))
    except Exception as exc:
        raise ImageReadError(
            f"Cannot read '{p}' as a DICOM SEG ({type(exc).__name__}: {exc}). Check that it is a DICOM "
            f"Segmentation object (SOP Class {SEG_SOP_CLASS_UID}) and that it was copied completely."
        ) from exc

    header = reference.header if isinstance(reference.header, dict) else {}
    src_uids = list(header.get("sop_instance_uids") or ())
    src_series = str(header.get("series_uid", ""))
    refd_series = [str(s.SeriesInstanceUID) for s in getattr(seg, "ReferencedSeriesSequence", [])]
    if reference.source_format != "dicom" or not src_uids:
        raise LabelMismatchError(
            f"The DICOM SEG '{p}' can only be placed on the DICOM series it was made from"
            f"{' (series ' + refd_series[0] + ')' if refd_series else ''}, but the image opened, "
            f"'{reference.source_path}', is not a DICOM series. Open that series' folder as the image."
        )
    if refd_series and src_series not in refd_series:
        raise LabelMismatchError(
            f"The DICOM SEG '{p}' was made on DICOM series {', '.join(refd_series)}, but the image opened, "
            f"'{reference.source_path}', is series {src_series}. Open the series the SEG refers to (same study, "
            f"same Series Instance UID), or the SEG that was made on this series."
        )
    seg_for = str(getattr(seg, "FrameOfReferenceUID", ""))
    src_for = str(header.get("0020|0052", "")).strip()
    if seg_for and src_for and seg_for != src_for:
        raise LabelMismatchError(
            f"The DICOM SEG '{p}' lies in Frame of Reference {seg_for}, but the image '{reference.source_path}' lies "
            f"in {src_for}: they are not in the same patient space. Open the series the SEG was made on."
        )
    n_i, n_j, n_k = reference.shape
    if (int(seg.Rows), int(seg.Columns)) != (n_j, n_i):
        raise LabelMismatchError(
            f"The DICOM SEG '{p}' has frames of {seg.Rows} rows x {seg.Columns} columns but the slices of "
            f"'{reference.source_path}' have {n_j} x {n_i}: it was not made on this image's grid. Resample it "
            f"onto the series first (e.g. in 3D Slicer)."
        )

    # Per-frame: which segment, which source instance (by UID, else by position).
    sfg = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else None
    k_of_uid = {u: k for k, u in enumerate(src_uids)}
    src_pos = np.array([[float(v) for v in s.split("\\")] if s else [np.nan] * 3
                        for s in header.get("image_positions_lps") or ()], dtype=np.float64)
    sp = np.asarray(reference.spacing)
    pos_tol = _POSITION_FRACTION * float(min(sp))
    n_frames = int(getattr(seg, "NumberOfFrames", 1))
    frame_k, frame_seg, refd_uids = [], [], []
    for f, pffg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ident = _frame_item(pffg, "SegmentIdentificationSequence") or (
            _frame_item(sfg, "SegmentIdentificationSequence") if sfg is not None else None)
        seg_number = int(ident.ReferencedSegmentNumber)
        uid = None
        deriv = _frame_item(pffg, "DerivationImageSequence")
        if deriv is not None and getattr(deriv, "SourceImageSequence", None):
            uid = str(deriv.SourceImageSequence[0].ReferencedSOPInstanceUID)
        plane = _frame_item(pffg, "PlanePositionSequence")
        ipp = np.array([float(v) for v in plane.ImagePositionPatient]) if plane is not None else None
        if uid is not None:
            if uid not in k_of_uid:
                raise LabelMismatchError(
                    f"The DICOM SEG '{p}' (frame {f + 1}) refers to the image {uid}, which is not among the "
                    f"{len(src_uids)} slices of '{reference.source_path}'. Slices are missing from the folder, or "
                    f"the SEG was made on another version of the series; open the complete series it refers to."
                )
            k = k_of_uid[uid]
            if ipp is not None and len(src_pos) == n_k and np.max(np.abs(ipp - src_pos[k])) > pos_tol:
                raise LabelMismatchError(
                    f"The DICOM SEG '{p}' (frame {f + 1}) refers to slice {uid} but lies at {ipp.round(3).tolist()} "
                    f"mm instead of that slice's {src_pos[k].round(3).tolist()} mm: its frames are not on the "
                    f"source slices, so it cannot be placed voxel for voxel."
                )
            refd_uids.append(uid)
        else:
            if ipp is None or len(src_pos) != n_k:
                raise LabelMismatchError(
                    f"The DICOM SEG '{p}' (frame {f + 1}) names neither its source image nor its position, so "
                    f"it cannot be placed on '{reference.source_path}'."
                )
            d = np.max(np.abs(src_pos - ipp[None, :]), axis=1)
            k = int(np.argmin(d))
            if d[k] > pos_tol:
                raise LabelMismatchError(
                    f"The DICOM SEG '{p}' has a frame at {ipp.round(3).tolist()} mm, which is not the position of any "
                    f"slice of '{reference.source_path}': it was not made on this series' slices."
                )
        frame_k.append(k)
        frame_seg.append(seg_number)

    # SEG dimension indices aside, pydicom decodes the frames: (F, rows, cols), BINARY as 0/1.
    pixels = np.asarray(seg.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[None]
    numbers = [int(d.SegmentNumber) for d in seg.SegmentSequence]
    dtype = np.uint8 if max(numbers, default=0) <= 254 else np.uint16
    labels_krc = np.zeros((n_k, n_j, n_i), dtype=dtype)
    overlap = 0
    # Lower segment numbers are painted last so they win where segments overlap.
    for f in sorted(range(len(frame_k)), key=lambda f: -frame_seg[f]):
        mask = pixels[f] > 0
        plane = labels_krc[frame_k[f]]
        overlap += int(np.count_nonzero(mask & (plane != 0) & (plane != frame_seg[f])))
        plane[mask] = frame_seg[f]
    if overlap:
        log.warning("DICOM SEG %s: %d voxels belong to several segments; the lower segment number keeps them",
                    p, overlap)

    names, colors, props = {}, {}, {}
    for d in seg.SegmentSequence:
        n = int(d.SegmentNumber)
        names[n] = str(getattr(d, "SegmentLabel", f"segment {n}"))
        if "RecommendedDisplayCIELabValue" in d:
            lab = hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in d.RecommendedDisplayCIELabValue))
            colors[n] = tuple(int(c) for c in lab.to_rgb())
        cat = d.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning if "SegmentedPropertyCategoryCodeSequence" in d else ""
        typ = d.SegmentedPropertyTypeCodeSequence[0].CodeMeaning if "SegmentedPropertyTypeCodeSequence" in d else ""
        props[n] = (str(cat), str(typ))
    return DicomSegLabels(
        labels_ijk=np.ascontiguousarray(labels_krc.transpose(2, 1, 0)),
        names=names, colors=colors, properties=props, n_frames=n_frames,
        referenced_sop_instance_uids=refd_uids, series_instance_uid=str(seg.SeriesInstanceUID))


def referenced_series_uids(path: str | os.PathLike) -> list[str]:
    """The Series Instance UIDs a DICOM SEG references (headers only)."""
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    return [str(s.SeriesInstanceUID) for s in getattr(ds, "ReferencedSeriesSequence", [])]
