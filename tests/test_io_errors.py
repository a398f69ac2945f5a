"""Failure modes of io/: every error is a sentence naming the file, and no write leaves debris."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsam_plugin.io import (
    ImageReadError,
    LabelMismatchError,
    LabelWriteError,
    Volume,
    read_labels,
    read_volume,
    write_label_map,
)
from medsam_plugin.io.writers import sidecar_paths, write_label_maps_per_object

AFFINE = np.diag([0.9, 0.9, 3.0, 1.0])


def _save_nii(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def small_volume(tmp_path: Path) -> Volume:
    data = np.random.default_rng(0).integers(-1000, 1000, size=(6, 5, 4)).astype(np.int16)
    return read_volume(_save_nii(tmp_path / "img.nii.gz", data))


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- reading --------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        read_volume(tmp_path / "nope.nii.gz")


def test_unknown_extension(tmp_path: Path) -> None:
    p = tmp_path / "scan.xyz"
    p.write_bytes(b"hello")
    with pytest.raises(ImageReadError, match=r"scan\.xyz.*not a known 3D image format"):
        read_volume(p)


@pytest.mark.parametrize("name", ["random.nii.gz", "random.nii", "random.nrrd", "random.mha"])
def test_random_bytes(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(np.random.default_rng(3).bytes(4096))
    with pytest.raises(ImageReadError) as info:
        read_volume(p)
    assert name in str(info.value)


def test_truncated_nii_gz(sample_dir: Path, tmp_path: Path) -> None:
    raw = (sample_dir / "ct_spleen_msd_spleen2_crop" / "image.nii.gz").read_bytes()
    p = tmp_path / "cut.nii.gz"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.nii\.gz.*(truncated|corrupt)"):
        read_volume(p)


def test_2d_image(tmp_path: Path) -> None:
    p = _save_nii(tmp_path / "slice.nii.gz", np.zeros((10, 12), np.int16), np.eye(4))
    with pytest.raises(ImageReadError, match="2D image"):
        read_volume(p)
    q = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.Image([10, 12], sitk.sitkInt16), str(q))
    with pytest.raises(ImageReadError, match="2D image"):
        read_volume(q)


def test_4d_image_is_refused_with_advice(tmp_path: Path) -> None:
    p = _save_nii(tmp_path / "fmri.nii.gz", np.zeros((4, 5, 6, 3), np.float32))
    with pytest.raises(ImageReadError) as info:
        read_volume(p)
    msg = str(info.value)
    assert "4D" in msg and "dimension 4 has 3" in msg and "Extract one volume" in msg


def test_4d_with_trailing_singleton_is_squeezed(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6, 1)
    vol = read_volume(_save_nii(tmp_path / "one.nii.gz", data))
    assert vol.shape == (4, 5, 6) and np.array_equal(vol.data_ijk, data[..., 0])


def test_nan_voxels(tmp_path: Path) -> None:
    data = np.ones((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    p = _save_nii(tmp_path / "nan.nii.gz", data)
    with pytest.raises(ImageReadError, match=r"2 of 120 voxels are not finite.*nonfinite='fill'"):
        read_volume(p)
    vol = read_volume(p, nonfinite="fill")
    assert np.all(np.isfinite(vol.data_ijk)) and vol.extra["nonfinite_filled"] == 2


def test_empty_dicom_folder(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    with pytest.raises(ImageReadError, match="no DICOM series"):
        read_volume(tmp_path / "dicom")


def test_several_dicom_series(tmp_path: Path, write_dicom_series) -> None:
    folder = tmp_path / "study"
    uids = ["1.2.826.0.1.3680043.2.1125.7.1", "1.2.826.0.1.3680043.2.1125.7.2"]
    for n, uid in zip((3, 4), uids):
        img = sitk.Image([6, 5, n], sitk.sitkInt16)
        img.SetSpacing((1.0, 1.0, 2.0))
        write_dicom_series(folder, img, series_uid=uid, modality="MR", description=f"series {n}")
    with pytest.raises(ImageReadError) as info:
        read_volume(folder)
    msg = str(info.value)
    assert "2 DICOM series" in msg and all(u in msg for u in uids) and "series_uid" in msg
    vol = read_volume(folder, series_uid=uids[1])
    assert vol.shape == (6, 5, 4) and vol.modality == "MR"
    with pytest.raises(ImageReadError, match="no DICOM series with UID"):
        read_volume(folder, series_uid="1.2.3")


# -- labels ---------------------------------------------------------------------------------
def test_label_wrong_shape(small_volume: Volume, tmp_path: Path) -> None:
    p = _save_nii(tmp_path / "lab.nii.gz", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(LabelMismatchError, match=r"shape \(6, 5, 3\).*\(6, 5, 4\)"):
        read_labels(p, small_volume)


def test_label_wrong_position(small_volume: Volume, tmp_path: Path) -> None:
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    p = _save_nii(tmp_path / "lab.nii.gz", np.zeros((6, 5, 4), np.uint8), shifted)
    with pytest.raises(LabelMismatchError, match="different position or orientation"):
        read_labels(p, small_volume)


def test_label_stored_flipped_is_mapped_back(small_volume: Volume, tmp_path: Path) -> None:
    lab = np.random.default_rng(2).integers(0, 3, size=(6, 5, 4)).astype(np.uint8)
    flipped = lab[::-1]  # same grid stored with i reversed: adjust the affine accordingly
    aff = AFFINE.copy()
    aff[0, 0] = -AFFINE[0, 0]
    aff[0, 3] = AFFINE[0, 0] * 5
    p = _save_nii(tmp_path / "lab.nii.gz", np.ascontiguousarray(flipped), aff)
    assert np.array_equal(read_labels(p, small_volume), lab)


def test_label_non_integer(small_volume: Volume, tmp_path: Path) -> None:
    p = _save_nii(tmp_path / "prob.nii.gz", np.full((6, 5, 4), 0.5, np.float32))
    with pytest.raises(ImageReadError, match="non-integer"):
        read_labels(p, small_volume)


# -- writing --------------------------------------------------------------------------------
def test_write_wrong_shape_leaves_nothing(small_volume: Volume, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(LabelWriteError, match="shape"):
        write_label_map(out / "seg.nii.gz", np.zeros((6, 5, 3), np.uint8), small_volume)
    assert not out.exists()


def test_write_parent_is_a_file(small_volume: Volume, tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(LabelWriteError, match=r"not_a_folder.*seg\.nii\.gz"):
        write_label_map(blocker / "seg.nii.gz", np.zeros((6, 5, 4), np.uint8), small_volume)
    assert _listing(tmp_path) == ["img.nii.gz", "not_a_folder"]


def test_full_disk_on_replace_leaves_no_partial_file(small_volume: Volume, tmp_path: Path, monkeypatch) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    old = np.zeros((6, 5, 4), np.uint8)
    target = write_label_map(out_dir / "seg.nii.gz", old, small_volume)
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(LabelWriteError, match="No space left"):
        write_label_map(target, np.ones((6, 5, 4), np.uint8), small_volume)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert after == before  # no temp files, previous output untouched


def test_failure_mid_write_leaves_no_partial_file(small_volume: Volume, tmp_path: Path, monkeypatch) -> None:
    def half_write(img, filename):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", half_write)
    with pytest.raises(LabelWriteError):
        write_label_map(tmp_path / "seg.nii.gz", np.zeros((6, 5, 4), np.uint8), small_volume)
    assert _listing(tmp_path) == ["img.nii.gz"]


def test_unsupported_output_extension(small_volume: Volume, tmp_path: Path) -> None:
    with pytest.raises(LabelWriteError, match="nii.gz"):
        write_label_map(tmp_path / "seg.nhdr", np.zeros((6, 5, 4), np.uint8), small_volume)
    assert _listing(tmp_path) == ["img.nii.gz"]


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_uint16_past_254(small_volume: Volume, tmp_path: Path, ext: str) -> None:
    lab = np.zeros((6, 5, 4), np.int64)
    lab[0, 0, 0], lab[1, 1, 1], lab[2, 2, 2] = 254, 300, 1
    out = write_label_map(tmp_path / f"seg{ext}", lab, small_volume, names={300: "many"})
    back = read_volume(out)
    assert back.data_ijk.dtype == np.uint16 and np.array_equal(back.data_ijk, lab)
    assert read_labels(out, small_volume).dtype == np.uint16
    lab[1, 1, 1] = 254
    out8 = write_label_map(tmp_path / f"seg8{ext}", lab, small_volume)
    assert read_volume(out8).data_ijk.dtype == np.uint8


def test_negative_or_fractional_labels_are_refused(small_volume: Volume, tmp_path: Path) -> None:
    with pytest.raises(LabelWriteError, match="negative"):
        write_label_map(tmp_path / "a.nii.gz", -np.ones((6, 5, 4), np.int16), small_volume)
    with pytest.raises(LabelWriteError, match="non-integer"):
        write_label_map(tmp_path / "b.nii.gz", np.full((6, 5, 4), 0.5), small_volume)
    assert _listing(tmp_path) == ["img.nii.gz"]


def test_nifti_header_resets_scaling(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), AFFINE)
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    vol = read_volume(tmp_path / "scaled.nii.gz")
    lab = np.zeros((6, 5, 4), np.uint8)
    lab[2, 2, 2] = 7
    out = write_label_map(tmp_path / "seg.nii.gz", lab, vol)
    back = nib.load(str(out))
    assert back.dataobj.slope == 1 and back.dataobj.inter == 0
    assert np.array_equal(np.asanyarray(back.dataobj), lab)
    assert int(back.header["sform_code"]) > 0 and int(back.header["qform_code"]) > 0


def test_sidecars_contents(small_volume: Volume, tmp_path: Path) -> None:
    import json

    lab = np.zeros((6, 5, 4), np.uint8)
    lab[0, 0, 0], lab[1, 0, 0] = 1, 2
    out = write_label_map(tmp_path / "seg.nii.gz", lab, small_volume, names={1: "left kidney", 2: "liver"}, colors={2: (0.0, 1.0, 0.0)})
    side = sidecar_paths(out)
    meta = json.loads(side["json"].read_text())
    assert [e["id"] for e in meta["labels"]] == [1, 2] and meta["labels"][1]["color"] == [0, 255, 0, 255]
    assert np.allclose(meta["affine"], small_volume.affine_ras)
    snap = side["itksnap"].read_text().splitlines()
    assert any(line.split()[0] == "2" and line.split()[1:4] == ["0", "255", "0"] and '"liver"' in line for line in snap if not line.startswith("#"))
    ctbl = side["ctbl"].read_text().splitlines()
    assert ctbl[0].startswith("# Color table file") and "1 left_kidney" in "\n".join(ctbl)


def test_per_object_failure_is_clean(small_volume: Volume, tmp_path: Path) -> None:
    blocker = tmp_path / "objs"
    blocker.write_text("x")
    lab = np.zeros((6, 5, 4), np.uint8)
    lab[0, 0, 0] = 1
    with pytest.raises(LabelWriteError):
        write_label_maps_per_object(blocker, lab, small_volume)
