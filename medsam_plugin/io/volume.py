"""The `Volume`: a 3D image array exactly as stored, with its geometry and source header.

Frames (docs/ARCHITECTURE.md):

- `data_ijk` is indexed (i, j, k) in the order nibabel gives for the file on disk. Nothing is
  reoriented or resampled on reading; SimpleITK's (z, y, x) arrays are transposed to (i, j, k).
- `affine_ras` (4x4 float64) maps a voxel index (i, j, k, 1) to world (x, y, z, 1) in
  millimetres, RAS+ (nibabel's convention): world +x points to the patient's Right,
  +y to Anterior, +z to Superior. (DICOM/ITK use LPS+: x_ras = -x_lps, y_ras = -y_lps.)
- `spacing` is the voxel size in mm along i, j, k: the column norms of the affine's 3x3 part.

The engine never works on `data_ijk` directly: `io.orientation.SliceView` maps it to a
radiological `view_zyx`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Volume", "guess_modality", "spacing_from_affine", "MODALITIES"]

MODALITIES = ("CT", "MR", "unknown")

# Heuristic thresholds for `guess_modality` (Hounsfield units).
_CT_LOW_PERCENTILE_RANGE = (-3100.0, -500.0)  # air is about -1000 HU; scanner padding -3024
_CT_HIGH_PERCENTILE_MAX = 4000.0  # dense bone / contrast stay well under this
_GUESS_MAX_SAMPLES = 2_000_000


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along i, j, k: the norms of the columns of the affine's 3x3 block."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def guess_modality(data: np.ndarray) -> str:
    """Guess "CT" or "MR" from intensities alone (used when no DICOM Modality tag exists).

    The rule, kept deliberately simple:
    CT when the 0.5th percentile lies in [-3100, -500] (air at about -1000 HU, scanner padding
    down to -3024 HU) and the 99.5th percentile is at most 4000 HU. Anything else is guessed
    "MR": this plugin targets CT and MRI, and the MR path (percentile normalisation) is the
    right one for any non-HU intensities. A constant or empty image gives "unknown".
    Large volumes are subsampled with a fixed stride, so the guess is deterministic.
    """
    flat = np.asarray(data).reshape(-1)
    if flat.size == 0:
        return "unknown"
    if flat.size > _GUESS_MAX_SAMPLES:
        flat = flat[:: int(np.ceil(flat.size / _GUESS_MAX_SAMPLES))]
    flat = flat[np.isfinite(flat)] if np.issubdtype(flat.dtype, np.floating) else flat
    if flat.size == 0:
        return "unknown"
    lo, hi = np.percentile(flat.astype(np.float64, copy=False), [0.5, 99.5])
    if lo == hi:
        return "unknown"
    if _CT_LOW_PERCENTILE_RANGE[0] <= lo <= _CT_LOW_PERCENTILE_RANGE[1] and hi <= _CT_HIGH_PERCENTILE_MAX:
        return "CT"
    return "MR"


@dataclass(repr=False)
class Volume:
    """A 3D image as stored in its file, plus geometry and provenance.

    Attributes:
        data_ijk: (I, J, K) array, the file's voxel values in stored index order (dtype as
            stored, after NIfTI scl_slope/scl_inter or DICOM rescale are applied).
        affine_ras: (4, 4) float64, voxel (i, j, k) -> world RAS+ mm.
        spacing: (3,) voxel size in mm along i, j, k (derived from the affine when omitted).
        header: the source nibabel header (NIfTI), or a dict of SimpleITK/DICOM metadata.
        source_path: the file or DICOM folder it came from (None for in-memory volumes).
        source_format: "nifti", "dicom", "nrrd", "mha", "vtk", "analyze", ... or "memory".
        modality: "CT", "MR" or "unknown".
        modality_source: "dicom" (tag 0008|0060), "guess" (`guess_modality`) or "user".
    """

    data_ijk: np.ndarray
    affine_ras: np.ndarray
    spacing: tuple[float, float, float] | None = None
    header: Any = None
    source_path: Path | None = None
    source_format: str = "memory"
    modality: str = "unknown"
    modality_source: str = "guess"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_ijk = np.asarray(self.data_ijk)
        if self.data_ijk.ndim != 3:
            raise ValueError(f"Volume.data_ijk must be 3D (I, J, K); got shape {self.data_ijk.shape}.")
        aff = np.asarray(self.affine_ras, dtype=np.float64)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
            raise ValueError(f"Volume.affine_ras must be a finite 4x4 matrix; got {aff!r}.")
        if abs(np.linalg.det(aff[:3, :3])) < 1e-12:
            raise ValueError("Volume.affine_ras is singular: the voxel-to-world mapping has no inverse.")
        self.affine_ras = aff
        if self.spacing is None:
            self.spacing = spacing_from_affine(aff)
        else:
            self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        if self.source_path is not None:
            self.source_path = Path(self.source_path)
        if self.modality not in MODALITIES:
            raise ValueError(f"Volume.modality must be one of {MODALITIES}; got {self.modality!r}.")

    # -- shape and geometry helpers -------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """(I, J, K), the stored array shape."""
        return tuple(int(s) for s in self.data_ijk.shape)  # type: ignore[return-value]

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Nearest anatomical direction of increasing i, j, k, e.g. ("R", "A", "S") or ("L", "P", "S")."""
        import nibabel as nib

        return tuple(nib.aff2axcodes(self.affine_ras))  # type: ignore[return-value]

    @property
    def is_oblique(self) -> bool:
        """True when the voxel axes are not aligned with the world axes (beyond 1e-4 rad-ish)."""
        rot = self.affine_ras[:3, :3] / np.asarray(self.spacing)
        return bool(np.any((np.abs(rot) > 1e-4) & (np.abs(rot) < 1 - 1e-4)))

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices (i, j, k; float allowed) -> (N, 3) world RAS mm."""
        pts = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return pts @ self.affine_ras[:3, :3].T + self.affine_ras[:3, 3]

    def with_data(self, data_ijk: np.ndarray) -> "Volume":
        """A new Volume on the same grid (same affine, header, provenance) with other voxels."""
        data = np.asarray(data_ijk)
        if data.shape != self.data_ijk.shape:
            raise ValueError(f"with_data needs shape {self.data_ijk.shape}; got {data.shape}.")
        return Volume(
            data_ijk=data,
            affine_ras=self.affine_ras.copy(),
            spacing=self.spacing,
            header=self.header,
            source_path=self.source_path,
            source_format=self.source_format,
            modality=self.modality,
            modality_source=self.modality_source,
            extra=dict(self.extra),
        )

    def describe(self) -> str:
        """One line for logs and the CLI."""
        sp = "x".join(f"{s:.3g}" for s in self.spacing)  # type: ignore[union-attr]
        name = self.source_path.name if self.source_path else "<memory>"
        return (
            f"{name}: {self.source_format} {self.modality} shape {self.shape} {self.data_ijk.dtype}, "
            f"spacing {sp} mm, orientation {''.join(self.axcodes)}{' (oblique)' if self.is_oblique else ''}"
        )

    def __repr__(self) -> str:
        return f"Volume({self.describe()})"
