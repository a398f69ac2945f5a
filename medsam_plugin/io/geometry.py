"""ITK (LPS origin, spacing, direction) <-> RAS affine: the one conversion readers and writers share."""

from __future__ import annotations

import numpy as np

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras_affine(origin_lps, spacing, direction_lps) -> np.ndarray:
    """ITK geometry (origin, spacing along i,j,k, row-major 3x3 direction; LPS) -> 4x4 RAS affine."""
    direction = np.asarray(direction_lps, dtype=np.float64).reshape(3, 3)
    aff_lps = np.eye(4)
    aff_lps[:3, :3] = direction * np.asarray(spacing, dtype=np.float64)[None, :]
    aff_lps[:3, 3] = np.asarray(origin_lps, dtype=np.float64)
    return _LPS_TO_RAS @ aff_lps


def ras_to_lps_geometry(affine_ras: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """4x4 RAS affine -> ITK (origin, spacing, direction) in LPS, as SimpleITK setters expect."""
    aff_lps = _LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
    m = aff_lps[:3, :3]
    spacing = np.sqrt((m**2).sum(axis=0))
    direction = m / spacing[None, :]
    return tuple(aff_lps[:3, 3].tolist()), tuple(spacing.tolist()), tuple(direction.reshape(-1).tolist())
