"""The plugin's reader, writer and sample data, without a viewer (no display needed)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medsam_plugin.io import SliceView, read_volume
from medsam_plugin.napari._reader import META_AXIS, META_VOLUME, napari_get_reader
from medsam_plugin.napari._sample_data import sample_ct, sample_ct_path
from medsam_plugin.napari._writer import write_labels

CASE = "ct_spleen_msd_spleen2_crop"


def test_reader_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path / "empty")) is None
    assert napari_get_reader(str(tmp_path / "missing.nii.gz")) is None
    assert napari_get_reader([str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")]) is None


def test_reader_shows_the_engine_view_with_physical_geometry(sample_dir):
    path = sample_dir / CASE / "image.nii.gz"
    reader = napari_get_reader(str(path))
    assert callable(reader)
    [(data, kwargs, kind)] = reader(str(path))
    volume = kwargs["metadata"][META_VOLUME]
    view = SliceView(volume, axis=kwargs["metadata"][META_AXIS])
    assert kind == "image"
    np.testing.assert_array_equal(data, view.to_view(volume.data_ijk))
    np.testing.assert_allclose(kwargs["scale"], view.view_spacing)
    np.testing.assert_allclose(kwargs["translate"], view.display_affine[:3, 3])
    assert kwargs["contrast_limits"] == (-160.0, 240.0)  # CT abdomen window


def test_writer_restores_the_source_grid_exactly(sample_dir, tmp_path):
    image = sample_dir / CASE / "image.nii.gz"
    [(_, kwargs, _)] = napari_get_reader(str(image))(str(image))
    volume = kwargs["metadata"][META_VOLUME]
    label_ijk = read_volume(sample_dir / CASE / "label.nii.gz").data_ijk.astype(np.uint8)
    labels_zyx = SliceView(volume).to_view(label_ijk)
    meta = {"metadata": {**kwargs["metadata"], "medsam_label_names": {1: "spleen"}}, "scale": kwargs["scale"],
            "translate": kwargs["translate"]}
    written = write_labels(str(tmp_path / "seg.nii.gz"), labels_zyx, meta)
    assert written[0] == str(tmp_path / "seg.nii.gz")
    assert any(p.endswith(".labels.json") for p in written) and any(p.endswith(".ctbl") for p in written)
    img = nib.load(written[0])
    src = nib.load(str(image))
    assert img.shape == src.shape
    assert np.allclose(img.affine, src.affine)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), label_ijk)
    assert "spleen" in (tmp_path / "seg.labels.json").read_text()


def test_writer_without_source_uses_the_layer_transform(sample_dir, tmp_path):
    """A Labels layer made with napari's own button (no metadata) lands on the same world grid."""
    image = sample_dir / CASE / "image.nii.gz"
    [(_, kwargs, _)] = napari_get_reader(str(image))(str(image))
    volume = kwargs["metadata"][META_VOLUME]
    view = SliceView(volume)
    labels_zyx = np.zeros(view.view_shape, np.uint8)
    labels_zyx[10, 20:30, 40:60] = 3
    path = write_labels(str(tmp_path / "plain"), labels_zyx, {"scale": kwargs["scale"], "translate": kwargs["translate"]})[0]
    assert path.endswith(".nii.gz")
    img = nib.load(path)
    # Same voxels in world space: compare through world coordinates of the labelled voxels.
    zyx = np.argwhere(labels_zyx == 3)
    world_expected = view.view_to_world(zyx)
    ijk = np.argwhere(np.asarray(img.dataobj) == 3)
    world_written = nib.affines.apply_affine(img.affine, ijk)
    np.testing.assert_allclose(np.sort(world_written, axis=0), np.sort(world_expected, axis=0), atol=1e-3)


def test_reader_reads_a_dicom_folder(tmp_path, write_dicom_series):
    import SimpleITK as sitk

    arr = (np.arange(4 * 12 * 10, dtype=np.int16).reshape(4, 12, 10) - 1000)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    write_dicom_series(tmp_path / "series", img, series_uid="1.2.826.0.1.3680043.2.1125.77")
    reader = napari_get_reader(str(tmp_path / "series"))
    assert callable(reader)
    [(data, kwargs, _)] = reader(str(tmp_path / "series"))
    assert data.shape == (4, 12, 10)
    np.testing.assert_allclose(kwargs["scale"], (2.5, 0.8, 0.7), atol=1e-4)


def test_sample_data_is_the_shipped_ct(sample_dir):
    assert sample_ct_path() == (sample_dir / CASE / "image.nii.gz").resolve()
    [(data, kwargs, kind)] = sample_ct()
    assert kind == "image" and data.shape == (26, 166, 164)


def test_sample_data_missing_says_what_to_do(monkeypatch, tmp_path):
    import medsam_plugin.napari._sample_data as sd

    monkeypatch.setattr(sd, "__file__", str(tmp_path / "a" / "b" / "c.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDSAM_PLUGIN_SAMPLE_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="MEDSAM_PLUGIN_SAMPLE_DATA"):
        sd.sample_ct_path()


def test_the_sarcoma_sample_opens_with_its_own_geometry(sample_dir):
    from medsam_plugin.napari._sample_data import SARCOMA_CASE, sample_sarcoma_mr

    [(data, kwargs, kind)] = sample_sarcoma_mr()
    assert kind == "image" and data.shape == (30, 114, 85)  # axial view of an 85 x 114 x 30 LPS MR
    np.testing.assert_allclose(kwargs["scale"], (3.27, 0.9766, 0.9766), atol=1e-3)
    assert (sample_dir / SARCOMA_CASE / "label.nii.gz").is_file()
