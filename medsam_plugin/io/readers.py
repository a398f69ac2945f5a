"""Reading 3D volumes and label maps into `Volume` objects.

- NIfTI (.nii, .nii.gz) through nibabel: `img.affine` is nibabel's best affine (sform when its
  code is set, else qform, else a scaling fallback); the header is kept for the writer.
- DICOM series (a folder, or one .dcm file standing for its series), NRRD (.nrrd, .nhdr),
  MetaImage (.mha, .mhd) and the other 3D formats SimpleITK reads: ITK's LPS origin/direction/
  spacing become a RAS affine, and SimpleITK's (z, y, x) array becomes (i, j, k).

Every failure raises `ImageReadError` with a sentence naming the file, what is wrong and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageReadError, LabelMismatchError
from .geometry import lps_to_ras_affine, ras_to_lps_geometry  # noqa: F401  (re-exported)
from .formats import IMAGE_SUFFIXES, NIFTI_SUFFIXES, SITK_SUFFIXES, as_label_array, matching_suffix
from .volume import Volume, guess_modality

__all__ = [
    "ImageReadError",
    "LabelMismatchError",
    "read_volume",
    "read_labels",
    "list_dicom_series",
    "detect_format",
    "lps_to_ras_affine",
    "ras_to_lps_geometry",
    "NIFTI_SUFFIXES",
    "SITK_SUFFIXES",
]

_NONFINITE_POLICIES = ("error", "fill")
_DICOM_MODALITY_TAG = "0008|0060"
_SERIES_UID_TAG = "0020|000e"
_SERIES_DESCRIPTION_TAG = "0008|103e"
_SOP_INSTANCE_UID_TAG = "0008|0018"
_IMAGE_POSITION_TAG = "0020|0032"
# Series of these modalities hold no image volume (segmentations, structure sets, reports...).
NON_IMAGE_MODALITIES = ("SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG")


# -- format detection -----------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """"nifti", "dicom" (folder or .dcm), or a SimpleITK format name; ImageReadError if unknown."""
    p = Path(path)
    if p.is_dir():
        return "dicom"
    if matching_suffix(p, NIFTI_SUFFIXES):
        return "nifti"
    suffix = matching_suffix(p, SITK_SUFFIXES)
    if suffix:
        return SITK_SUFFIXES[suffix]
    known = ", ".join([*IMAGE_SUFFIXES, "a DICOM folder"])
    raise ImageReadError(
        f"Cannot read '{p}': the extension '{''.join(p.suffixes) or '(none)'}' is not a known 3D image "
        f"format. Supported: {known}. Convert the image to NIfTI (.nii.gz) or NRRD, or rename it "
        f"if the extension is wrong."
    )


# -- public readers -------------------------------------------------------------------------
def read_volume(
    path: str | os.PathLike,
    *,
    series_uid: str | None = None,
    nonfinite: str = "error",
    modality: str | None = None,
) -> Volume:
    """Read a 3D image into a `Volume` (array as stored, RAS affine, header, modality).

    Args:
        path: a NIfTI/NRRD/MetaImage/... file, a DICOM series folder, or one .dcm file of a series.
        series_uid: which series to read when a DICOM folder holds several
            (`list_dicom_series(folder)` lists them).
        nonfinite: what to do with NaN/inf voxels. "error" (default) raises ImageReadError;
            "fill" replaces NaN and -inf with the lowest finite value and +inf with the highest,
            and records the count in `Volume.extra["nonfinite_filled"]`.
        modality: "CT"/"MR" to override the DICOM tag or the intensity guess.

    A 4D image whose extra dimensions all have size 1 is squeezed to 3D; a true 4D image
    (several volumes) is refused with advice to extract one.
    """
    if nonfinite not in _NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {_NONFINITE_POLICIES}; got {nonfinite!r}.")
    p = Path(path).expanduser()
    if not p.exists():
        raise ImageReadError(
            f"Cannot read '{p}': no such file or folder. Check the path (and that the disk is mounted)."
        )
    fmt = detect_format(p)
    from .dicom_seg import is_dicom_seg

    if p.is_file() and is_dicom_seg(p):
        raise ImageReadError(
            f"'{p}' is a DICOM SEG (a segmentation), not an image. Open the DICOM series it was made on as the "
            f"image, then load the SEG as labels (read_labels(seg, volume), or open it in napari next to the scan)."
        )
    if fmt == "nifti":
        data, affine, header = _read_nifti(p)
        dicom_modality = None
    elif fmt == "dicom":
        if p.is_file():  # one .dcm file stands for the series it belongs to
            data, affine, header = _read_dicom(p.parent, series_uid or _series_uid_of_file(p))
        else:
            data, affine, header = _read_dicom(p, series_uid)
        dicom_modality = header.get(_DICOM_MODALITY_TAG)
    else:
        data, affine, header = _read_sitk_file(p, fmt)
        dicom_modality = header.get(_DICOM_MODALITY_TAG)

    data = _ensure_3d(data, p)
    _check_voxel_type(data, p)
    extra: dict[str, Any] = {}
    data, n_filled = _check_finite(data, p, nonfinite)
    if n_filled:
        extra["nonfinite_filled"] = n_filled
    if isinstance(header, dict) and header.get(IRREGULAR_SLICES):
        # Read anyway: a DICOM SEG is written on the acquired slices; anything that needs the
        # millimetres between slices (a label map's affine, world coordinates) must check this.
        extra[IRREGULAR_SLICES] = header[IRREGULAR_SLICES]

    if modality is not None:
        if modality not in ("CT", "MR", "unknown"):
            raise ValueError(f"modality must be 'CT', 'MR' or 'unknown'; got {modality!r}.")
        mod, mod_src = modality, "user"
    elif dicom_modality:
        tag = str(dicom_modality).strip().upper()
        mod, mod_src = (tag if tag in ("CT", "MR") else "unknown"), "dicom"
    else:
        mod, mod_src = guess_modality(data), "guess"

    try:
        return Volume(
            data_ijk=data,
            affine_ras=affine,
            header=header,
            source_path=p,
            source_format=fmt,
            modality=mod,
            modality_source=mod_src,
            extra=extra,
        )
    except ValueError:  # a singular or non-finite voxel-to-world matrix
        a = np.asarray(affine, dtype=np.float64)
        why = ("holds NaN or infinite values" if not np.all(np.isfinite(a)) else
               "is singular (a voxel size of 0, or two axes along one direction)")
        raise ImageReadError(
            f"Cannot use '{p}': its voxel-to-world matrix (affine, or origin/spacing/direction) {why}, so voxels "
            f"have no position in space. Fix the header (e.g. with nibabel or 3D Slicer), or export it again."
        ) from None


def read_labels(
    path: str | os.PathLike,
    reference: Volume,
    *,
    atol: float = 1e-3,
    allow_reorient: bool = True,
) -> np.ndarray:
    """Read a label map that belongs to `reference` and return it in the reference's voxel grid.

    A DICOM SEG file is placed on the DICOM series `reference` through the source instances its
    frames reference (values = segment numbers; `io.dicom_seg.read_dicom_seg` also gives names).

    Returns:
        (I, J, K) uint8 array (uint16 once a label id exceeds 254) in `reference.data_ijk`'s
        index order.

    Raises:
        LabelMismatchError: the shape differs, or the voxel-to-world affines differ by more than
            `atol` (mm, elementwise). When `allow_reorient` is True, a label map stored as a pure
            axis permutation/flip of the same grid (e.g. saved in another orientation) is mapped
            back losslessly instead of refused.
        ImageReadError: the file cannot be read, or its values are not non-negative integers.
    """
    p = Path(path)
    from .dicom_seg import is_dicom_seg, read_dicom_seg

    if is_dicom_seg(p):  # placed by the source instances it references, not by an affine
        return read_dicom_seg(p, reference).labels_ijk
    lab = read_volume(p, modality="unknown")
    data = lab.data_ijk
    lab_aff = lab.affine_ras

    misfit = data.shape != reference.shape or not np.allclose(lab_aff, reference.affine_ras, atol=atol, rtol=0)
    if allow_reorient and misfit:
        data, lab_aff = _reorient_to_reference(data, lab_aff, reference.affine_ras)

    if data.shape != reference.shape:
        raise LabelMismatchError(
            f"The label map '{p}' has shape {tuple(data.shape)} but the image "
            f"'{reference.source_path}' has shape {reference.shape}: they are not on the same voxel "
            f"grid. Use the label map made for this image, or resample it onto the image first."
        )
    if not np.allclose(lab_aff, reference.affine_ras, atol=atol, rtol=0):
        diff = float(np.max(np.abs(lab_aff - reference.affine_ras)))
        raise LabelMismatchError(
            f"The label map '{p}' has the right shape {reference.shape} but a different position or "
            f"orientation in space than '{reference.source_path}' (affines differ by up to {diff:.4g} mm). "
            f"Use the label map made for this image, or resample it onto the image first."
        )
    return _as_label_dtype(data, p)


def list_dicom_series(folder: str | os.PathLike) -> list[dict]:
    """The DICOM series in a folder: [{"series_uid", "n_files", "description", "modality"}]."""
    import SimpleITK as sitk

    folder = Path(folder)
    try:
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except Exception as exc:  # pragma: no cover - GDCM failures are rare
        raise ImageReadError(f"Cannot scan '{folder}' for DICOM series: {exc}.") from exc
    out = []
    for uid in uids:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        desc, mod = "", ""
        if files:
            try:
                fr = sitk.ImageFileReader()
                fr.SetFileName(files[0])
                fr.ReadImageInformation()
                if fr.HasMetaDataKey(_SERIES_DESCRIPTION_TAG):
                    desc = fr.GetMetaData(_SERIES_DESCRIPTION_TAG).strip()
                if fr.HasMetaDataKey(_DICOM_MODALITY_TAG):
                    mod = fr.GetMetaData(_DICOM_MODALITY_TAG).strip()
            except Exception:
                pass
        out.append({"series_uid": uid, "n_files": len(files), "description": desc, "modality": mod})
    return out


# -- format-specific readers ----------------------------------------------------------------
# Deflate never compresses better than about 1032:1, so a gzip file of n bytes holds at most
# ~1032 n bytes: a header that declares more is refused before anything is allocated.
# bzip2 packs at most 45,899,236 bytes into one block (900,000 bytes after its first run-length
# step, each 5 of them a run of up to 255), and a block costs at least about 22 bytes (headers,
# CRC, symbol map, selectors, two code tables): at most ~2.1 million bytes per file byte. 20 bytes
# a block is assumed, to stay on the safe side (1 GiB of zeros takes 785 bytes: 1.4 million:1).
_MAX_RATIO = {"gzip": 1032, True: 1032, "bzip2": 45_899_236 // 20}


def _check_payload(p: Path, shape, itemsize: int, payload_bytes: int, compressed) -> None:
    """Refuse a header whose declared voxels cannot be in the file (a damaged or hostile header).
    compressed: False (raw bytes), True or "gzip" (deflate), "bzip2"."""
    n_voxels = 1
    for s in shape:
        n_voxels *= max(int(s), 0)
    needed = n_voxels * int(itemsize)
    available = payload_bytes * _MAX_RATIO[compressed] + 65536 if compressed else payload_bytes  # slack: headers
    if needed > available:
        shape_text = "x".join(str(int(s)) for s in shape)
        raise ImageReadError(
            f"Cannot read '{p}': its header declares {shape_text} voxels ({needed:,} bytes), but the file holds "
            f"{'at most ' + format(available, ',') if compressed else format(max(payload_bytes, 0), ',')} bytes of "
            f"voxel data: the file is truncated or its header is damaged. Copy or export it again."
        )


def _nifti_scaling_check(p: Path, dataobj, data: np.ndarray) -> None:
    """scl_slope/scl_inter that overflow float32 (e.g. 1e38) would give a blank or infinite image.
    (After loading, nibabel keeps the file's scaling on the array proxy, not on the header.)"""
    slope = float(np.asarray(getattr(dataobj, "slope", 1.0)).reshape(-1)[0])
    inter = float(np.asarray(getattr(dataobj, "inter", 0.0)).reshape(-1)[0])
    if slope == 1.0 and inter == 0.0:
        return
    limit = float(np.finfo(np.float32).max)
    if not (np.isfinite(slope) and np.isfinite(inter)):
        bad = True
    elif data.size and np.issubdtype(data.dtype, np.number):
        lo, hi = float(np.min(data)), float(np.max(data))
        bad = max(abs(lo), abs(hi)) > limit
    else:
        bad = False
    if bad:
        raise ImageReadError(
            f"Cannot use '{p}': its intensity scaling (scl_slope {slope:g}, scl_inter {inter:g}) gives values beyond "
            f"the float32 range, so the image would be blank or infinite. Fix scl_slope/scl_inter in the header "
            f"(1 and 0 for unscaled data), or export the image again."
        )


def _read_nifti(p: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    import nibabel as nib

    try:
        img = nib.load(str(p))
    except Exception as exc:
        raise ImageReadError(
            f"Cannot read '{p}': it is not a valid NIfTI file ({type(exc).__name__}: {exc}). The file "
            f"may be corrupt or only partly copied; copy or export it again."
        ) from exc
    header = img.header
    try:
        shape, itemsize, offset = header.get_data_shape(), header.get_data_dtype().itemsize, int(header.get_data_offset())
    except Exception:
        shape = None
    if shape is not None:
        compressed = p.name.lower().endswith(".gz")
        _check_payload(p, shape, itemsize, p.stat().st_size - (0 if compressed else offset), compressed)
    try:
        # dataobj applies scl_slope/scl_inter when they are set, and keeps the stored dtype otherwise.
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise ImageReadError(
            f"Cannot read the voxels of '{p}': the file is truncated or corrupt "
            f"({type(exc).__name__}: {exc}). Copy or export it again."
        ) from exc
    if isinstance(data, np.memmap):
        data = np.array(data)
    _nifti_scaling_check(p, img.dataobj, data)
    affine = np.asarray(img.affine, dtype=np.float64)
    return data, affine, img.header


_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}
_NRRD_BYTES = {"int8": 1, "uint8": 1, "char": 1, "uchar": 1, "signed char": 1, "unsigned char": 1, "short": 2,
               "ushort": 2, "int16": 2, "uint16": 2, "short int": 2, "unsigned short": 2, "int": 4, "uint": 4,
               "int32": 4, "uint32": 4, "unsigned int": 4, "float": 4, "double": 8, "longlong": 8,
               "ulonglong": 8, "int64": 8, "uint64": 8, "long long": 8, "unsigned long long": 8}


# NRRD encodings -> how the file's bytes bound the voxel bytes: False raw, "gzip" / "bzip2" a
# compressed stream (see _MAX_RATIO), None text (ascii, hex).
_NRRD_ENCODINGS = {"raw": False, "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2", "ascii": None,
                   "text": None, "txt": None, "hex": None}


def _check_sitk_declared_size(p: Path, fmt: str) -> None:
    """MetaImage / NRRD: compare the size the text header declares with the data in the file,
    before SimpleITK allocates it (a 100-byte file declaring 1024^3 voxels is refused at once)."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(65536)
        size = p.stat().st_size
    except OSError:
        return
    try:
        if fmt == "mha":
            fields, end = {}, None
            pos = 0
            for line in head.split(b"\n"):
                pos += len(line) + 1
                key, sep, value = line.decode("latin-1").partition("=")
                if not sep:
                    continue
                fields[key.strip().lower()] = value.strip()
                if key.strip().lower() == "elementdatafile":
                    end = pos
                    break
            if end is None or "dimsize" not in fields:
                return
            shape = [int(v) for v in fields["dimsize"].split()]
            itemsize = _MET_BYTES.get(fields.get("elementtype", "").upper())
            if itemsize is None:
                return
            itemsize *= int(fields.get("elementnumberofchannels", "1") or 1)
            data_file = fields["elementdatafile"]
            if data_file.upper() == "LOCAL":
                payload = size - end
            elif data_file.upper().startswith("LIST") or "%" in data_file:
                return
            else:
                target = p.parent / data_file
                if not target.is_file():
                    raise ImageReadError(f"Cannot read '{p}': its data file '{target}' (ElementDataFile) does not "
                                         f"exist. Keep the .mhd and its data file together.")
                payload = target.stat().st_size
            compressed = fields.get("compresseddata", "false").lower() == "true"
        else:  # nrrd
            text = head.decode("latin-1")
            if not text.startswith("NRRD"):
                return
            header_text, sep, _ = text.partition("\n\n")  # a detached header (.nhdr) may just end
            fields = {}
            for line in header_text.splitlines()[1:]:
                if line.startswith("#") or ":" not in line or ":=" in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "sizes" not in fields:
                return
            shape = [int(v) for v in fields["sizes"].split()]
            itemsize = _NRRD_BYTES.get(fields.get("type", "").lower())
            encoding = fields.get("encoding", "raw").lower()
            if itemsize is None or encoding not in _NRRD_ENCODINGS:
                return  # an encoding without a cheap bound: SimpleITK decides
            data_file = fields.get("data file", fields.get("datafile"))
            if data_file is None:
                if not sep:
                    return
                header_bytes = len((header_text + sep).encode("latin-1"))
                if header_bytes > len(head):  # a header longer than what was read: no bound here
                    return
                payload = size - header_bytes
            elif data_file.upper().startswith("LIST") or "%" in data_file or " " in data_file.strip():
                return  # several data files: SimpleITK decides
            else:  # a detached header: the voxels are in another file
                target = p.parent / data_file.strip()
                if not target.is_file():
                    raise ImageReadError(f"Cannot read '{p}': its data file '{target}' (\"data file:\" in the header) "
                                         f"does not exist. Keep the .nhdr and its data file together.")
                payload = target.stat().st_size
            compressed = _NRRD_ENCODINGS[encoding]
            if compressed is None:  # text: a value takes a digit and a separator (the last none), a byte two hex digits
                if encoding == "hex":
                    itemsize = 2 * itemsize
                else:
                    itemsize, payload = 2, payload + 1
                compressed = False
    except (ValueError, UnicodeDecodeError):
        return  # an unusual header: SimpleITK decides
    _check_payload(p, shape, itemsize, payload, compressed)
    if compressed == "bzip2":  # SimpleITK would allocate the whole volume first, then fail to decode it
        raise ImageReadError(f"Cannot read '{p}': its voxels are bzip2-compressed, which the NRRD reader here "
                             f"(SimpleITK) cannot decode. Save it again with gzip or raw encoding, or convert it to "
                             f"NIfTI (.nii.gz).")


def _read_sitk_file(p: Path, fmt: str) -> tuple[np.ndarray, np.ndarray, dict]:
    import SimpleITK as sitk

    if fmt in ("mha", "nrrd"):
        _check_sitk_declared_size(p, fmt)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        image = reader.Execute()
    except Exception as exc:
        raise ImageReadError(
            f"Cannot read '{p}' as {fmt.upper()}: the file is corrupt, truncated or not in that "
            f"format ({_first_line(exc)}). Export it again, or convert it to NIfTI (.nii.gz)."
        ) from exc
    header = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    return _sitk_to_ijk(image, p, header)


def _read_dicom(folder: Path, series_uid: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
    import SimpleITK as sitk

    series = list_dicom_series(folder)
    if not series:
        raise ImageReadError(
            f"Cannot read '{folder}': the folder holds no DICOM series (no readable DICOM files were "
            f"found). Point to the folder that contains the .dcm slices of one series."
        )
    uids = [s["series_uid"] for s in series]
    if series_uid is None:
        # A SEG (or RTSTRUCT, SR...) saved beside its scan is not a second image to choose from.
        images = [s for s in series if s["modality"].upper() not in NON_IMAGE_MODALITIES]
        if len(images) == 1 and len(series) > 1:
            series = images
        if len(series) > 1:
            listing = "; ".join(
                f"{s['series_uid']} ({s['n_files']} files, {s['modality'] or '?'}"
                f"{', ' + repr(s['description']) if s['description'] else ''})"
                for s in series
            )
            raise ImageReadError(
                f"The folder '{folder}' holds {len(series)} DICOM series: {listing}. Choose one by "
                f"passing series_uid=... (CLI: --series-uid)."
            )
        series_uid = series[0]["series_uid"]
    elif series_uid not in uids:
        raise ImageReadError(
            f"The folder '{folder}' has no DICOM series with UID {series_uid}; it holds: {', '.join(uids)}."
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    if len(files) < 2:
        raise ImageReadError(
            f"The DICOM series {series_uid} in '{folder}' has only {len(files)} file: that is a 2D image, "
            f"not a 3D volume. Use a series with several slices (or one multi-frame file of a 3D volume)."
        )
    try:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        reader.LoadPrivateTagsOff()
        image = reader.Execute()
    except Exception as exc:
        raise ImageReadError(
            f"Cannot read the DICOM series {series_uid} in '{folder}' ({_first_line(exc)}). Some slices may be "
            f"missing, corrupt or of different sizes; export the series again."
        ) from exc
    header = {k: reader.GetMetaData(0, k) for k in reader.GetMetaDataKeys(0)}
    header["series_uid"] = series_uid
    header["n_files"] = len(files)
    # Slice k of the volume is files[k] (the reader stacks them in this order): a DICOM SEG written
    # later references these instances and takes each frame's position from them (io/dicom_seg.py).
    header["dicom_files"] = tuple(str(f) for f in files)
    header["sop_instance_uids"] = tuple(_slice_tag(reader, k, _SOP_INSTANCE_UID_TAG) for k in range(len(files)))
    header["image_positions_lps"] = tuple(_slice_tag(reader, k, _IMAGE_POSITION_TAG) for k in range(len(files)))
    note = _irregular_slices(folder, files, header["image_positions_lps"], image)
    if note:
        header[IRREGULAR_SLICES] = note
    return _sitk_to_ijk(image, folder, header)


# Volume.extra key (and DICOM header key) of a series whose slices do not lie on the volume's grid.
IRREGULAR_SLICES = "irregular_slices"
_POSITION_FRACTION = 0.05  # of the slice spacing: how far a slice may lie from its place on the grid


def _irregular_slices(folder: Path, files, positions_text, image) -> str:
    """"" when the series' slices lie on the regular grid its Volume describes, else a sentence saying
    how they do not (a missing slice, uneven spacing, a gantry tilt). Two slices at one position are
    refused: no 3D volume has them, so the series is mixed or damaged.

    SimpleITK stacks the files and gives the volume one slice spacing: right for the slices
    themselves (slice k is file k, and a DICOM SEG takes each frame's position from its file), wrong
    in millimetres between them, which a label map with one affine would carry (issue 21: slices at
    0, 5, 15 and 20 mm were read as four slices 6.67 mm apart)."""
    try:
        positions = np.array([[float(v) for v in str(t).split("\\")] for t in positions_text], dtype=np.float64)
    except ValueError:
        return ""
    if positions.shape != (len(files), 3) or len(files) < 2:
        return ""
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(image.GetDimension(), -1)[:3, 2]
    along = positions @ normal
    steps = np.diff(along)
    spacing = float(image.GetSpacing()[2])
    tolerance = _POSITION_FRACTION * max(float(np.median(np.abs(steps))), 1e-6)
    same = np.flatnonzero(np.abs(steps) <= tolerance)
    if same.size:
        k = int(same[0])
        raise ImageReadError(
            f"Cannot use the DICOM series in '{folder}': its files '{Path(files[k]).name}' and "
            f"'{Path(files[k + 1]).name}' are slices at the same position ({along[k]:.2f} mm along the slice "
            f"normal), so the series mixes two acquisitions or holds a copied slice. Remove the duplicate, or "
            f"export the series again.")
    expected = positions[0] + np.arange(len(files))[:, None] * spacing * normal[None, :]
    if np.max(np.linalg.norm(positions - expected, axis=1)) <= _POSITION_FRACTION * spacing:
        return ""
    gaps = np.abs(steps)
    if np.ptp(gaps) > _POSITION_FRACTION * spacing:
        return (f"its slices are unevenly spaced ({gaps.min():.3g} to {gaps.max():.3g} mm apart: a missing slice?), "
                f"so one slice spacing ({spacing:.3g} mm) puts some of them in the wrong place")
    return "its slices are tilted (a gantry tilt), which one slice direction without shear cannot describe"


def _slice_tag(reader, k: int, tag: str) -> str:
    return reader.GetMetaData(k, tag).strip() if reader.HasMetaDataKey(k, tag) else ""


def _series_uid_of_file(p: Path) -> str | None:
    import SimpleITK as sitk

    try:
        fr = sitk.ImageFileReader()
        fr.SetFileName(str(p))
        fr.ReadImageInformation()
        return fr.GetMetaData(_SERIES_UID_TAG).strip() if fr.HasMetaDataKey(_SERIES_UID_TAG) else None
    except Exception as exc:
        raise ImageReadError(
            f"Cannot read '{p}': it is not a readable DICOM file ({_first_line(exc)}). Check the file, or "
            f"point to the folder that holds the whole series."
        ) from exc


def _sitk_to_ijk(image, p: Path, header: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """SimpleITK image -> (data_ijk, RAS affine, header); squeezes trailing size-1 dimensions."""
    import SimpleITK as sitk

    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp != 1:
        raise ImageReadError(
            f"Cannot use '{p}': it has {ncomp} values per voxel (a colour or vector image), not one "
            f"intensity. Convert it to a single-channel (greyscale) 3D image first."
        )
    dim = image.GetDimension()
    size = image.GetSize()
    if dim < 3:
        raise ImageReadError(
            f"Cannot use '{p}': it is a 2D image of size {size}, not a 3D volume. Load the whole series "
            f"or a 3D file (NIfTI, NRRD, DICOM folder)."
        )
    if dim > 3:
        extra = size[3:]
        if any(s != 1 for s in extra):
            raise _four_d_error(p, (*size[:3], *extra))
        origin = image.GetOrigin()[:3]
        spacing = image.GetSpacing()[:3]
        d = np.asarray(image.GetDirection()).reshape(dim, dim)[:3, :3]
        arr = sitk.GetArrayFromImage(image).reshape(size[2], size[1], size[0])
    else:
        origin, spacing, d = image.GetOrigin(), image.GetSpacing(), image.GetDirection()
        arr = sitk.GetArrayFromImage(image)
    data = np.ascontiguousarray(arr.transpose(2, 1, 0))  # (z, y, x) -> (i, j, k)
    affine = lps_to_ras_affine(origin, spacing, d)
    return data, affine, header


# -- checks ---------------------------------------------------------------------------------
def _four_d_error(p: Path, shape) -> ImageReadError:
    shape = tuple(int(s) for s in shape)
    dims = ", ".join(f"dimension {i + 1} has {n}" for i, n in enumerate(shape[3:], start=3))
    return ImageReadError(
        f"Cannot use '{p}': it is a {len(shape)}D image of shape {shape} ({dims} volumes, e.g. time "
        f"points or channels), not one 3D volume. Extract one volume first, e.g. with nibabel "
        f"`img.slicer[..., 0]`, `fslroi in out 0 1`, or SimpleITK `image[:, :, :, 0]`."
    )


def _ensure_3d(data: np.ndarray, p: Path) -> np.ndarray:
    shape = data.shape
    if data.ndim < 3:
        raise ImageReadError(
            f"Cannot use '{p}': it is a {data.ndim}D image of shape {tuple(shape)}, not a 3D volume. "
            f"Load the whole series or a 3D file (NIfTI, NRRD, DICOM folder)."
        )
    if data.ndim > 3:
        if all(s == 1 for s in shape[3:]):
            return data.reshape(shape[:3])
        raise _four_d_error(p, shape)
    return data


def _check_voxel_type(data: np.ndarray, p: Path) -> None:
    """One real intensity per voxel: refuse colour (RGB) and complex images instead of misreading them."""
    if data.dtype.names is not None or data.dtype.kind == "V":
        raise ImageReadError(
            f"Cannot use '{p}': it is a colour (RGB) image, not one intensity per voxel. Convert it to a "
            f"single-channel (greyscale) 3D image first."
        )
    if np.iscomplexobj(data):
        raise ImageReadError(
            f"Cannot use '{p}': it holds complex numbers (e.g. raw MR k-space or phase data), not intensities. "
            f"Save the magnitude image (abs) and use that."
        )
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise ImageReadError(f"Cannot use '{p}': its voxel type {data.dtype} is not a number.")


def _check_finite(data: np.ndarray, p: Path, policy: str) -> tuple[np.ndarray, int]:
    if not np.issubdtype(data.dtype, np.floating):
        return data, 0
    finite = np.isfinite(data)
    if finite.all():
        return data, 0
    n_bad = int(data.size - np.count_nonzero(finite))
    n_nan = int(np.count_nonzero(np.isnan(data)))
    if policy == "error" or not finite.any():
        raise ImageReadError(
            f"Cannot use '{p}': {n_bad} of {data.size} voxels are not finite numbers "
            f"({n_nan} NaN, {n_bad - n_nan} infinite). Fix the image (e.g. replace NaN by the background "
            f"value), or read it with nonfinite='fill' to replace them by the lowest/highest finite value."
        )
    lo, hi = float(data[finite].min()), float(data[finite].max())
    data = np.nan_to_num(data, nan=lo, neginf=lo, posinf=hi)
    return data, n_bad


def _as_label_dtype(data: np.ndarray, p: Path) -> np.ndarray:
    """Check integer-valued, non-negative labels and return uint8 (or uint16 past 254): the rule of
    `formats.as_label_array`, worded for a file that is read."""

    def fail(kind: str, value) -> ImageReadError:
        if kind == "non_integer":
            return ImageReadError(
                f"'{p}' is not a label map: it holds non-integer values (e.g. a probability map or an "
                f"intensity image). Threshold or round it to integer label ids first."
            )
        if kind == "not_numeric":
            return ImageReadError(f"'{p}' is not a label map: its voxel type {value} is not numeric.")
        if kind == "negative":
            return ImageReadError(
                f"'{p}' is not a valid label map: it holds negative values (min {value}). Label ids must be "
                f"0 (background) or positive integers."
            )
        return ImageReadError(
            f"'{p}' has label ids up to {value}; at most 65535 label ids are supported. Renumber the labels."
        )

    return as_label_array(data, fail)


def _reorient_to_reference(data: np.ndarray, lab_aff: np.ndarray, ref_aff: np.ndarray):
    """Map a label array stored as an axis permutation/flip of the reference grid onto it."""
    import nibabel.orientations as nio

    try:
        t = nio.ornt_transform(nio.io_orientation(lab_aff), nio.io_orientation(ref_aff))
    except Exception:
        return data, lab_aff
    if np.array_equal(t, [[0, 1], [1, 1], [2, 1]]):
        return data, lab_aff
    new_data = nio.apply_orientation(data, t)
    new_aff = lab_aff @ nio.inv_ornt_aff(t, data.shape)
    return new_data, new_aff


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # SimpleITK messages start with the C++ source location; the useful text is usually last.
    return lines[-1] if lines else type(exc).__name__
