"""Volumes in (nibabel, SimpleITK), label maps out (atomic), and slice orientation.

No torch, napari or Qt here. See docs/ARCHITECTURE.md for the frames (`data_ijk`, `affine_ras`,
`view_zyx`).
"""

from .dicom_seg import DicomSegWriteError, read_dicom_seg, write_dicom_seg
from .orientation import SliceView
from .readers import ImageReadError, LabelMismatchError, list_dicom_series, read_labels, read_volume
from .volume import Volume, guess_modality
from .writers import (
    LabelWriteError,
    default_label_color,
    default_palette,
    sidecar_paths,
    write_label_map,
    write_label_maps_per_object,
)

__all__ = [
    "Volume",
    "read_volume",
    "read_labels",
    "list_dicom_series",
    "guess_modality",
    "SliceView",
    "write_label_map",
    "write_label_maps_per_object",
    "write_dicom_seg",
    "read_dicom_seg",
    "DicomSegWriteError",
    "default_label_color",
    "default_palette",
    "sidecar_paths",
    "ImageReadError",
    "LabelWriteError",
    "LabelMismatchError",
]
