"""Geometry of io/: reading, the radiological SliceView, and label round trips in the source grid."""

from __future__ import annotations

import subprocess
import sys
from itertools import product
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsam_plugin.io import SliceView, Volume, read_labels, read_volume, write_label_map
from medsam_plugin.io.readers import lps_to_ras_affine
from medsam_plugin.io.writers import sidecar_paths, write_label_maps_per_object

# Direction each view axis must point to, as (RAS world axis, sign), per docs/ARCHITECTURE.md.
EXPECTED_VIEW_DIRECTIONS = {
    "axial": [(2, +1), (1, -1), (0, -1)],  # slices I->S, rows A->P, cols R->L
    "coronal": [(1, +1), (2, -1), (0, -1)],  # slices P->A, rows S->I, cols R->L
    "sagittal": [(0, -1), (2, -1), (1, -1)],  # slices R->L, rows S->I, cols A->P
}


def _corners(shape) -> np.ndarray:
    return np.array(list(product(*[(0, n - 1) for n in shape])), dtype=np.int64)


def _assert_view_directions(sv: SliceView) -> None:
    """Each view axis must step along its expected world axis (nearest axis, right sign)."""
    for view_axis, (world_axis, sign) in enumerate(EXPECTED_VIEW_DIRECTIONS[sv.axis]):
        step = sv.view_affine[:3, view_axis]  # world displacement of +1 along this view axis
        assert int(np.argmax(np.abs(step))) == world_axis, (sv, view_axis, step)
        assert np.sign(step[world_axis]) == sign, (sv, view_axis, step)


def _check_slice_view(vol: Volume, sv: SliceView, array_ijk: np.ndarray) -> None:
    view = sv.to_view(array_ijk)
    assert view.shape == sv.view_shape
    back = sv.from_view(view)
    assert back.shape == array_ijk.shape and np.array_equal(back, array_ijk)
    _assert_view_directions(sv)
    # view spacing is the stored spacing permuted
    assert sorted(sv.view_spacing) == pytest.approx(sorted(vol.spacing))
    # index maps agree with the arrays and with the world geometry
    corners = _corners(vol.shape)
    zyx = sv.voxel_to_view(corners)
    assert np.array_equal(sv.view_to_voxel(zyx), corners)
    for c, v in zip(corners, zyx):
        assert view[tuple(v)] == array_ijk[tuple(c)]
    world = vol.voxel_to_world(corners)
    assert np.allclose(sv.view_to_world(zyx), world, atol=1e-6)
    assert np.allclose(sv.world_to_view(world), zyx, atol=1e-6)


def _check_written_label(path: Path, label_ijk: np.ndarray, vol: Volume) -> None:
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, vol.affine_ras, atol=1e-4)
    assert np.array_equal(np.asanyarray(img.dataobj), label_ijk)
    simg = sitk.ReadImage(str(path))
    assert simg.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(simg).transpose(2, 1, 0), label_ijk)
    s_aff = lps_to_ras_affine(simg.GetOrigin(), simg.GetSpacing(), simg.GetDirection())
    assert np.allclose(s_aff, vol.affine_ras, atol=1e-3)


# -- real cases -----------------------------------------------------------------------------
def test_real_case_geometry_and_label_round_trip(data_case: Path, tmp_path: Path) -> None:
    vol = read_volume(data_case / "image.nii.gz")
    label = read_labels(data_case / "label.nii.gz", vol)
    assert vol.data_ijk.ndim == 3 and label.shape == vol.shape and label.dtype == np.uint8
    expected_modality = "CT" if data_case.name.startswith("ct_") else "MR"
    assert vol.modality == expected_modality and vol.modality_source == "guess"
    # the stored grid is kept exactly as nibabel gives it
    ref = nib.load(str(data_case / "image.nii.gz"))
    assert np.array_equal(vol.data_ijk, np.asanyarray(ref.dataobj)) and np.allclose(vol.affine_ras, ref.affine)

    for axis in ("axial", "coronal", "sagittal"):
        _check_slice_view(vol, SliceView(vol, axis=axis), label)

    out = write_label_map(tmp_path / "seg.nii.gz", label, vol, names={1: "object one"})
    _check_written_label(out, np.asanyarray(nib.load(str(data_case / "label.nii.gz")).dataobj), vol)
    assert all(p.is_file() for p in sidecar_paths(out).values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.ctbl", "seg.itksnap.txt", "seg.labels.json", "seg.nii.gz"]


def test_manifest_matches_reader(manifest: dict, shared_data_dir: Path) -> None:
    for case_id, entry in manifest.items():
        vol = read_volume(shared_data_dir / case_id / "image.nii.gz")
        assert list(vol.shape) == entry["size_xyz"]
        assert np.allclose(vol.spacing, entry["spacing_xyz"], atol=1e-3)
        assert vol.modality == entry["modality"]


def test_shared_data_covers_several_orientations(shared_data_dir: Path) -> None:
    codes = {"".join(nib.aff2axcodes(nib.load(str(p / "image.nii.gz")).affine)) for p in shared_data_dir.iterdir() if p.is_dir()}
    assert {"RAS", "LPS"} <= codes


# -- synthetic orientations -----------------------------------------------------------------
def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def _affine(rot: np.ndarray, spacing, origin) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(spacing, float)[None, :]
    aff[:3, 3] = origin
    return aff


SYNTHETIC_ORIENTATIONS = {
    "RAS": np.eye(3),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "LAS": np.diag([-1.0, 1.0, 1.0]),
    "RAI": np.diag([1.0, 1.0, -1.0]),
    "sagittal-stored PSL": np.array([[0, 0, -1.0], [-1.0, 0, 0], [0, 1.0, 0]]),  # i->P, j->S, k->L
    "coronal-stored LIA": np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]),
    "oblique 20deg": _rotation(2, 20) @ _rotation(0, 20),
}


@pytest.mark.parametrize("name", list(SYNTHETIC_ORIENTATIONS))
def test_synthetic_orientations(name: str, tmp_path: Path) -> None:
    rot = SYNTHETIC_ORIENTATIONS[name]
    shape = (7, 9, 5)
    aff = _affine(rot, (0.8, 1.1, 2.5), (-30.0, 12.0, 40.0))
    rng = np.random.default_rng(0)
    data = rng.normal(size=shape).astype(np.float32)
    vol = Volume(data, aff, source_path=tmp_path / "img.nii.gz", source_format="nifti")
    assert vol.is_oblique == name.startswith("oblique")
    labels = rng.integers(0, 4, size=shape).astype(np.uint8)
    for axis in ("axial", "coronal", "sagittal"):
        _check_slice_view(vol, SliceView(aff, shape, axis=axis), labels)

    out = write_label_map(tmp_path / "seg.nii.gz", labels, vol)
    _check_written_label(out, labels, vol)
    # obliquity and orientation survive: the label is in the source grid with the source affine
    reread = read_volume(out)
    assert np.allclose(reread.affine_ras, aff, atol=1e-5)
    assert np.array_equal(read_labels(out, vol), labels)
    for ext in (".nrrd", ".mha"):
        out2 = write_label_map(tmp_path / f"seg{ext}", labels, vol, sidecars=False)
        back = read_volume(out2)
        assert back.source_format == ext[1:]
        assert np.allclose(back.affine_ras, aff, atol=1e-5) and np.array_equal(back.data_ijk, labels)


def test_axial_view_of_ras_volume_is_transpose_and_flips() -> None:
    """Spell the axial mapping out for a plain RAS grid: view[z, y, x] = a[I-1-x, J-1-y, z]."""
    shape = (4, 3, 2)
    a = np.arange(np.prod(shape)).reshape(shape)
    sv = SliceView(np.eye(4), shape, axis="axial")
    expected = a[::-1, ::-1, :].transpose(2, 1, 0)
    assert np.array_equal(sv.to_view(a), expected)
    assert sv.view_shape == (2, 3, 4) and sv.n_slices == 2
    assert np.array_equal(sv.voxel_to_view([[0, 0, 0]]), [[0, 2, 3]])


# -- SimpleITK formats ----------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_nrrd_mha_world_coordinates_match_nifti(sample_case: Path, ext: str, tmp_path: Path) -> None:
    nii = sample_case / "image.nii.gz"
    ref = read_volume(nii)
    converted = tmp_path / f"image{ext}"
    sitk.WriteImage(sitk.ReadImage(str(nii)), str(converted), True)  # ITK's own NIfTI reader
    vol = read_volume(converted)
    assert vol.source_format == ext[1:] and isinstance(vol.header, dict)
    assert vol.shape == ref.shape and np.array_equal(vol.data_ijk, ref.data_ijk)
    corners = _corners(ref.shape)
    assert np.allclose(vol.voxel_to_world(corners), ref.voxel_to_world(corners), atol=1e-3)
    assert vol.modality == ref.modality
    # a label map in NRRD/MHA against a NIfTI reference
    lab = read_labels(sample_case / "label.nii.gz", ref)
    out = write_label_map(tmp_path / f"seg{ext}", lab, ref, sidecars=False)
    assert np.array_equal(read_labels(out, ref), lab)


# -- DICOM ----------------------------------------------------------------------------------
def _synthetic_lps_image() -> sitk.Image:
    rng = np.random.default_rng(1)
    arr_zyx = rng.integers(-1000, 1500, size=(5, 6, 8)).astype(np.int16)
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-40.0, 25.0, 100.0))
    rot = _rotation(2, 10)  # slightly oblique in-plane
    img.SetDirection(tuple(rot.reshape(-1)))
    return img


def test_dicom_series_geometry(tmp_path: Path, write_dicom_series) -> None:
    img = _synthetic_lps_image()
    write_dicom_series(tmp_path / "series", img, series_uid="1.2.826.0.1.3680043.2.1125.1.42", description="synthetic")
    vol = read_volume(tmp_path / "series")
    assert vol.source_format == "dicom"
    assert vol.modality == "CT" and vol.modality_source == "dicom"
    assert vol.shape == (8, 6, 5)
    assert np.array_equal(vol.data_ijk, sitk.GetArrayFromImage(img).transpose(2, 1, 0))
    expected = lps_to_ras_affine(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    assert np.allclose(vol.affine_ras, expected, atol=1e-4)
    # world position of voxel (i, j, k) agrees with ITK's own index->physical mapping (LPS)
    for ijk in _corners(vol.shape):
        lps = np.array(img.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk)))
        assert np.allclose(vol.voxel_to_world(ijk)[0], lps * [-1, -1, 1], atol=1e-4)
    # one file of the series stands for the series
    one = read_volume(sorted((tmp_path / "series").iterdir())[0])
    assert np.array_equal(one.data_ijk, vol.data_ijk)
    # and the axial view runs inferior -> superior
    _assert_view_directions(SliceView(vol))


def test_per_object_files(sample_dir: Path, tmp_path: Path) -> None:
    case = sample_dir / "ct_abdomen_totalseg_sm"
    vol = read_volume(case / "image.nii.gz")
    lab = read_labels(case / "label.nii.gz", vol)
    ids = [int(i) for i in np.unique(lab) if i][:3]
    written = write_label_maps_per_object(tmp_path, lab, vol, names={ids[0]: "liver / main"}, ids=ids)
    assert sorted(written) == ids
    assert written[ids[0]].name == f"{ids[0]:03d}_liver_main.nii.gz"
    for i, p in written.items():
        m = np.asanyarray(nib.load(str(p)).dataobj)
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        assert np.array_equal(m.astype(bool), lab == i)


def test_io_imports_no_torch_or_napari() -> None:
    code = (
        "import sys, medsam_plugin.io; "
        "bad = [m for m in ('torch', 'napari', 'qtpy', 'PyQt5', 'magicgui') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_one_list_of_views():
    """The command lines' view choices (views.py) are the views orientation knows the axes of."""
    from medsam_plugin.io.orientation import VIEW_AXCODES
    from medsam_plugin.views import VIEWS

    assert tuple(VIEW_AXCODES) == VIEWS
