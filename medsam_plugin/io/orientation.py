"""`SliceView`: the pure transpose/flip between a stored (i, j, k) array and a radiological view.

The view array `view_zyx` has shape (n_slices, rows, cols) for a slicing axis:

============  ==========================  ======================  ====================
axis          slice index (z)             rows (y)                cols (x)
============  ==========================  ======================  ====================
axial         inferior -> superior        anterior -> posterior   patient right -> left
coronal       posterior -> anterior       superior -> inferior    patient right -> left
sagittal      patient right -> left       superior -> inferior    anterior -> posterior
============  ==========================  ======================  ====================

In nibabel axis codes (the direction each view axis *increases towards*) these are
axial ("S", "P", "L"), coronal ("A", "I", "L"), sagittal ("L", "I", "P").

The mapping is found with `nibabel.orientations` (io_orientation -> ornt_transform ->
apply_orientation / inv_ornt_aff) and is only axis permutations and flips: no resampling, so
`from_view(to_view(a))` returns `a` exactly. For an oblique affine the nearest voxel axes are
used (io_orientation), so the view is only approximately radiological, but `view_affine` still
carries the exact (oblique) geometry, and label maps stay in the source voxel grid with the
source affine on writing, so obliquity is never lost.
"""

from __future__ import annotations

import numpy as np
import nibabel.orientations as nio

from .volume import Volume, spacing_from_affine

__all__ = ["SliceView", "VIEW_AXCODES", "AXES", "LETTER_TO_WORLD"]

VIEW_AXCODES: dict[str, tuple[str, str, str]] = {
    "axial": ("S", "P", "L"),
    "coronal": ("A", "I", "L"),
    "sagittal": ("L", "I", "P"),
}
AXES = tuple(VIEW_AXCODES)

# Anatomical letter -> (RAS world axis, sign of the direction it points along).
LETTER_TO_WORLD = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


class SliceView:
    """Maps a volume's (i, j, k) voxel array to a radiological (slice, row, col) view and back.

    Args:
        volume_or_affine: a `Volume` (its affine and shape are used), or a 4x4 voxel->RAS affine.
        shape: (I, J, K) stored array shape; required with an affine, ignored with a Volume.
        axis: "axial" (default), "coronal" or "sagittal".

    Attributes:
        axis: the slicing axis name.
        source_shape: (I, J, K).
        view_shape: (n_slices, rows, cols).
        transform: nibabel orientation array (3, 2): row d = (view axis of stored axis d, +1/-1 flip).
        source_affine: (4, 4) voxel ijk -> RAS mm.
        view_affine: (4, 4) view index (z, y, x) -> RAS mm (exact, oblique included).
        display_affine: (4, 4) view index (z, y, x) -> world mm expressed along the view's own
            anatomical directions (e.g. axial: +S, +P, +L). For non-oblique data it is a positive
            diagonal scaling plus an offset, which is what napari needs to show `view_zyx` with
            correct physical geometry in radiological orientation (pass it as the layer `affine`).
    """

    def __init__(self, volume_or_affine, shape=None, axis: str = "axial") -> None:
        if axis not in VIEW_AXCODES:
            raise ValueError(f"axis must be one of {AXES}; got {axis!r}.")
        if isinstance(volume_or_affine, Volume):
            affine = volume_or_affine.affine_ras
            shape = volume_or_affine.shape
        else:
            affine = np.asarray(volume_or_affine, dtype=np.float64)
            if shape is None:
                raise ValueError("SliceView needs the array shape (I, J, K) when given an affine.")
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"SliceView needs a 4x4 affine; got shape {affine.shape}.")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise ValueError(f"SliceView needs a 3D shape (I, J, K); got {shape}.")

        self.axis = axis
        self.source_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.source_affine = affine
        self._src_ornt = nio.io_orientation(affine)
        self._view_ornt = nio.axcodes2ornt(VIEW_AXCODES[axis])
        self.transform = nio.ornt_transform(self._src_ornt, self._view_ornt)
        self._inverse = nio.ornt_transform(self._view_ornt, self._src_ornt)
        self._perm = self.transform[:, 0].astype(int)  # stored axis d -> view axis
        self._flip = self.transform[:, 1] < 0  # stored axis d is reversed in the view

        view_shape = [0, 0, 0]
        for d in range(3):
            view_shape[self._perm[d]] = shape[d]
        self.view_shape: tuple[int, int, int] = tuple(view_shape)  # type: ignore[assignment]

        self.view_affine = affine @ nio.inv_ornt_aff(self.transform, shape)
        self._inv_view_affine = np.linalg.inv(self.view_affine)
        ras_to_display = np.zeros((4, 4))
        ras_to_display[3, 3] = 1.0
        for row, letter in enumerate(VIEW_AXCODES[axis]):
            world_axis, sign = LETTER_TO_WORLD[letter]
            ras_to_display[row, world_axis] = sign
        self.ras_to_display = ras_to_display
        self.display_affine = ras_to_display @ self.view_affine

    # -- arrays ---------------------------------------------------------------------------
    def to_view(self, array_ijk: np.ndarray) -> np.ndarray:
        """(I, J, K, ...) stored array -> (n_slices, rows, cols, ...) view (a numpy view, no copy)."""
        a = np.asanyarray(array_ijk)
        if tuple(a.shape[:3]) != self.source_shape:
            raise ValueError(
                f"to_view expects an array of shape {self.source_shape} (the stored i, j, k grid); "
                f"got {tuple(a.shape)}."
            )
        return nio.apply_orientation(a, self.transform)

    def from_view(self, array_zyx: np.ndarray) -> np.ndarray:
        """(n_slices, rows, cols, ...) view array -> (I, J, K, ...) stored grid; exact inverse of `to_view`."""
        a = np.asanyarray(array_zyx)
        if tuple(a.shape[:3]) != self.view_shape:
            raise ValueError(
                f"from_view expects an array of shape {self.view_shape} (n_slices, rows, cols for the "
                f"{self.axis} view); got {tuple(a.shape)}."
            )
        return nio.apply_orientation(a, self._inverse)

    # -- coordinates ----------------------------------------------------------------------
    def voxel_to_view(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) stored voxel indices (i, j, k) -> (N, 3) view indices (z, y, x); ints stay ints."""
        pts = np.atleast_2d(np.asarray(ijk))
        self._check_points(pts, "voxel_to_view")
        out = np.empty_like(pts)
        for d in range(3):
            col = pts[:, d]
            out[:, self._perm[d]] = (self.source_shape[d] - 1) - col if self._flip[d] else col
        return out

    def view_to_voxel(self, zyx: np.ndarray) -> np.ndarray:
        """(N, 3) view indices (z, y, x) -> (N, 3) stored voxel indices (i, j, k); ints stay ints."""
        pts = np.atleast_2d(np.asarray(zyx))
        self._check_points(pts, "view_to_voxel")
        out = np.empty_like(pts)
        for d in range(3):
            col = pts[:, self._perm[d]]
            out[:, d] = (self.source_shape[d] - 1) - col if self._flip[d] else col
        return out

    def view_to_world(self, zyx: np.ndarray) -> np.ndarray:
        """(N, 3) view indices (z, y, x), float allowed -> (N, 3) world RAS mm."""
        pts = np.atleast_2d(np.asarray(zyx, dtype=np.float64))
        self._check_points(pts, "view_to_world")
        return pts @ self.view_affine[:3, :3].T + self.view_affine[:3, 3]

    def world_to_view(self, xyz_ras: np.ndarray) -> np.ndarray:
        """(N, 3) world RAS mm -> (N, 3) continuous view indices (z, y, x), float64."""
        pts = np.atleast_2d(np.asarray(xyz_ras, dtype=np.float64))
        self._check_points(pts, "world_to_view")
        return pts @ self._inv_view_affine[:3, :3].T + self._inv_view_affine[:3, 3]

    # -- geometry summaries ---------------------------------------------------------------
    @property
    def view_spacing(self) -> tuple[float, float, float]:
        """(slice, row, col) spacing in mm."""
        return spacing_from_affine(self.view_affine)

    @property
    def n_slices(self) -> int:
        return int(self.view_shape[0])

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(rows, cols) of one view slice."""
        return int(self.view_shape[1]), int(self.view_shape[2])

    def __repr__(self) -> str:
        codes = "".join(nio.ornt2axcodes(self._src_ornt))
        sp = "x".join(f"{s:.3g}" for s in self.view_spacing)
        return f"SliceView({self.axis}, stored {codes} {self.source_shape} -> view {self.view_shape}, {sp} mm)"

    @staticmethod
    def _check_points(pts: np.ndarray, fn: str) -> None:
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError(f"{fn} expects points of shape (N, 3); got {pts.shape}.")
