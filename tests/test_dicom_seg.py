"""DICOM in, DICOM SEG out: the SEG lands on the source slices, references them, and reads back exactly.

The DICOM series are written from the shipped sample CTs with SimpleITK (conftest's
`write_dicom_series`) and completed with what a scanner export has and SimpleITK leaves out
(Frame of Reference UID, patient ID, series number).
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

highdicom = pytest.importorskip("highdicom")

from medsam_plugin.io import ImageReadError, LabelMismatchError, SliceView, read_labels, read_volume  # noqa: E402
from medsam_plugin.io.dicom_seg import (  # noqa: E402
    SEG_SOP_CLASS_UID,
    DicomSegWriteError,
    check_dicom_seg_source,
    parse_property,
    read_dicom_seg,
    segment_property,
    write_dicom_seg,
)

SPLEEN = "ct_spleen_msd_spleen2_crop"
TOTALSEG = "ct_abdomen_totalseg_sm"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
UID_ROOT = "1.2.826.0.1.3680043.8.498.7714"


def _sitk_image(path, direction=None):
    import SimpleITK as sitk

    img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkInt16)
    if direction is not None:
        img.SetDirection(direction)
    return img


def make_series(write_dicom_series, folder, image, series="5", *, frame_of_reference=True, edit=None):
    """Write `image` as a DICOM series like a scanner export; `edit(k, ds)` may change slice k."""
    files = write_dicom_series(folder, image, series_uid=f"{UID_ROOT}.{series}")
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if frame_of_reference:
            ds.FrameOfReferenceUID = f"{UID_ROOT}.99"
        ds.PatientID, ds.PatientName, ds.SeriesNumber = "ANON01", "Anon^Patient", 3
        if edit is not None:
            edit(k, ds)
        ds.save_as(f)
    return files


@pytest.fixture
def spleen(sample_dir, tmp_path_factory, write_dicom_series):
    """(DICOM volume, NIfTI volume, NIfTI label map on the NIfTI grid) for the spleen sample."""
    folder = tmp_path_factory.mktemp("spleen_dicom") / "series"
    make_series(write_dicom_series, folder, _sitk_image(sample_dir / SPLEEN / "image.nii.gz"))
    nifti = read_volume(sample_dir / SPLEEN / "image.nii.gz")
    labels = read_labels(sample_dir / SPLEEN / "label.nii.gz", nifti)
    return read_volume(folder), nifti, labels


def _per_frame(seg):
    """[(referenced SOP Instance UID, segment number, ImagePositionPatient)] for each frame."""
    out = []
    shared = seg.SharedFunctionalGroupsSequence[0]
    for item in seg.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ident = item if "SegmentIdentificationSequence" in item else shared  # shared when it is one segment
        number = ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        out.append((str(uid), int(number), [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]))
    return out


def _check_geometry(ds, volume, expected_ijk):
    """Place every frame by its own plane position and orientation (no UIDs) on our RAS (i, j, k) grid.

    The frame's ImagePositionPatient (LPS) must be voxel (0, 0, k) of the volume, its row/column
    directions the volume's i/j axes, and its pixels (rows, cols) the expected labels of slice k.
    """
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    spacing = np.array([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing])  # (row, col) spacing
    np.testing.assert_allclose((LPS[:3, :3] @ iop[:3]) * spacing[1], volume.affine_ras[:3, 0], atol=1e-4)
    np.testing.assert_allclose((LPS[:3, :3] @ iop[3:]) * spacing[0], volume.affine_ras[:3, 1], atol=1e-4)
    inv = np.linalg.inv(volume.affine_ras)
    pixels = ds.pixel_array if int(ds.NumberOfFrames) > 1 else ds.pixel_array[None]
    placed = np.zeros(expected_ijk.shape, dtype=np.uint16)
    for f, (_, number, ipp) in enumerate(_per_frame(ds)):
        i, j, k = (inv @ LPS @ np.array([*ipp, 1.0]))[:3]
        assert abs(i) < 1e-3 and abs(j) < 1e-3 and abs(k - round(k)) < 1e-3, (f, i, j, k)
        placed[:, :, int(round(k))][pixels[f].T > 0] = number
    np.testing.assert_array_equal(placed, expected_ijk)


def test_spleen_round_trip_is_voxel_exact_and_references_the_source(spleen, tmp_path):
    volume, nifti, labels = spleen
    # The DICOM export keeps the NIfTI's grid, so the NIfTI label map is the DICOM volume's label map.
    np.testing.assert_allclose(volume.affine_ras, nifti.affine_ras, atol=1e-4)
    np.testing.assert_array_equal(volume.data_ijk, nifti.data_ijk.astype(np.int16))
    source_uids = list(volume.header["sop_instance_uids"])
    assert len(source_uids) == volume.shape[2] == len(set(source_uids))

    out = write_dicom_seg(tmp_path / "spleen_seg.dcm", labels, volume, names={1: "spleen"}, colors={1: (230, 25, 75)},
                          model_name="lite_medsam")
    assert [p.name for p in tmp_path.iterdir()] == ["spleen_seg.dcm"]  # no temporary file, no sidecar left

    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == SEG_SOP_CLASS_UID and ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    first = pydicom.dcmread(volume.header["dicom_files"][0], stop_before_pixels=True)
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.PatientID == "ANON01"
    [ref_series] = ds.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == volume.header["series_uid"]
    assert [str(r.ReferencedSOPInstanceUID) for r in ref_series.ReferencedInstanceSequence] == source_uids
    [segment] = ds.SegmentSequence
    assert segment.SegmentLabel == "spleen" and segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"  # SCT Spleen
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    algo = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "medsam-plugin" and "lite_medsam" in str(algo.AlgorithmParameters)
    assert highdicom.color.CIELabColor.from_dicom_value(tuple(segment.RecommendedDisplayCIELabValue)).to_rgb() == (230, 25, 75)

    # Frames: one per slice holding spleen, each on (and referencing) its own source slice.
    frames = _per_frame(ds)
    spleen_slices = [k for k in range(volume.shape[2]) if labels[:, :, k].any()]
    assert ds.NumberOfFrames == len(frames) == len(spleen_slices)
    assert sorted(source_uids.index(uid) for uid, _, _ in frames) == spleen_slices
    for uid, _, ipp in frames:
        src = pydicom.dcmread(volume.header["dicom_files"][source_uids.index(uid)], stop_before_pixels=True)
        assert ipp == [float(v) for v in src.ImagePositionPatient]

    # Second and third readers: highdicom by source instance, pydicom by plane geometry alone.
    seg = highdicom.seg.segread(str(out))
    by_uid = seg.get_pixels_by_source_instance(source_uids, combine_segments=True, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(by_uid.transpose(2, 1, 0), labels)
    _check_geometry(ds, volume, labels)

    # The project's reader: read_labels and read_dicom_seg land on the source grid with the name.
    np.testing.assert_array_equal(read_labels(out, volume), labels)
    back = read_dicom_seg(out, volume)
    assert back.names == {1: "spleen"} and back.colors == {1: (230, 25, 75)}
    assert back.properties == {1: ("Anatomical Structure", "Spleen")}
    assert sorted(map(source_uids.index, back.referenced_sop_instance_uids)) == spleen_slices


def test_many_segments_on_an_oblique_series_stored_against_its_normal(sample_dir, tmp_path, write_dicom_series):
    """41 sparse TotalSegmentator ids on a rotated series whose files run opposite to the slice normal.

    The LPS direction's columns are i = (-c, -s, 0), j = (-s, c, 0), k = (0, 0, 1): a left-handed
    frame, so the DICOM normal (row x col) points inferior while the files go superior; the reader
    stacks the slices along the normal, i.e. reversed. LPS/RAS, i/j/k and slice order must all hold.
    """
    import SimpleITK as sitk

    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    direction = (-c, -s, 0.0, -s, c, 0.0, 0.0, 0.0, 1.0)  # row-major
    image = _sitk_image(sample_dir / TOTALSEG / "image.nii.gz", direction)
    folder = tmp_path / "oblique"
    make_series(write_dicom_series, folder, image)
    volume = read_volume(folder)
    assert volume.is_oblique and volume.affine_ras[2, 2] == pytest.approx(-3.0)  # k runs inferior
    written_ijk = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    np.testing.assert_array_equal(volume.data_ijk, written_ijk[:, :, ::-1])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_dir / TOTALSEG / "label.nii.gz"))).transpose(2, 1, 0)
    labels = np.ascontiguousarray(labels[:, :, ::-1]).astype(np.uint8)  # on the volume's slice order
    ids = [int(i) for i in np.unique(labels) if i]
    assert len(ids) == 41 and ids != list(range(1, 42))  # sparse ids: 12, 15-17, ... are absent
    names = {i: f"organ {i}" for i in ids}
    names[1], names[2], names[5] = "spleen", "kidney_right", "liver"

    out = write_dicom_seg(tmp_path / "organs.dcm", labels, volume, names=names, model_name="lite_medsam")
    ds = pydicom.dcmread(out)
    # DICOM numbers segments 1..n: label ids keep their order, names keep their ids' segment.
    numbering = {i: n for n, i in enumerate(ids, start=1)}
    assert [d.SegmentLabel for d in ds.SegmentSequence] == [names[i] for i in ids]
    assert ds.SegmentSequence[numbering[2] - 1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Kidney"
    assert ds.SegmentSequence[numbering[30] - 1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"
    assert len({tuple(d.RecommendedDisplayCIELabValue) for d in ds.SegmentSequence}) == 41
    expected = np.zeros_like(labels)
    for i, n in numbering.items():
        expected[labels == i] = n
    assert ds.NumberOfFrames == sum(int((labels[:, :, k] == i).any()) for i in ids for k in range(labels.shape[2]))

    seg = highdicom.seg.segread(str(out))
    uids = list(volume.header["sop_instance_uids"])
    by_uid = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(by_uid.transpose(2, 1, 0), expected)
    iop = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient]
    np.testing.assert_allclose(iop, [-c, -s, 0, -s, c, 0], atol=1e-6)
    _check_geometry(ds, volume, expected)
    back = read_dicom_seg(out, volume)
    np.testing.assert_array_equal(back.labels_ijk, expected)
    assert back.names == {numbering[i]: names[i] for i in ids}


@pytest.mark.parametrize("kind", ["missing slice", "gantry tilt"])
def test_uneven_or_tilted_series_gets_frames_on_the_acquired_slices(spleen, sample_dir, tmp_path, write_dicom_series, kind):
    _, _, labels = spleen
    tilt = np.tan(np.radians(12)) * 5.0  # mm of shift along the rows per 5 mm slice

    def shear(k, ds):
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [f"{ipp[0]:.6f}", f"{ipp[1] + k * tilt:.6f}", f"{ipp[2]:.6f}"]

    folder = tmp_path / "series"
    files = make_series(write_dicom_series, folder, _sitk_image(sample_dir / SPLEEN / "image.nii.gz"),
                        edit=shear if kind == "gantry tilt" else None)
    if kind == "missing slice":
        files[12].unlink()
        labels = np.delete(labels, 12, axis=2)
    volume = read_volume(folder)
    source = check_dicom_seg_source(volume)
    assert not source.regular and ("tilted" if kind == "gantry tilt" else "spacing varies") in source.note

    out = write_dicom_seg(tmp_path / "seg.dcm", labels, volume, names={1: "spleen"})
    uids = list(volume.header["sop_instance_uids"])
    for uid, _, ipp in _per_frame(pydicom.dcmread(out)):
        src = pydicom.dcmread(volume.header["dicom_files"][uids.index(uid)], stop_before_pixels=True)
        np.testing.assert_allclose(ipp, [float(v) for v in src.ImagePositionPatient], atol=1e-6)
    seg = highdicom.seg.segread(str(out))
    by_uid = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(by_uid.transpose(2, 1, 0), labels)
    np.testing.assert_array_equal(read_labels(out, volume), labels)


def test_a_seg_of_another_series_or_a_nifti_is_refused(spleen, sample_dir, tmp_path, write_dicom_series):
    volume, nifti, labels = spleen
    out = write_dicom_seg(tmp_path / "seg.dcm", labels, volume, names={1: "spleen"})
    other = tmp_path / "other"
    make_series(write_dicom_series, other, _sitk_image(sample_dir / SPLEEN / "image.nii.gz"), series="6")
    with pytest.raises(LabelMismatchError, match=rf"made on DICOM series {UID_ROOT}\.5.*is series {UID_ROOT}\.6"):
        read_labels(out, read_volume(other))
    with pytest.raises(LabelMismatchError, match="is not a DICOM series"):
        read_labels(out, nifti)
    with pytest.raises(ImageReadError, match="is a DICOM SEG .*not an image"):
        read_volume(out)


def test_a_seg_without_source_references_is_placed_by_position(spleen, tmp_path):
    """SEGs from tools that omit the per-frame source image are placed by plane position, and checked."""
    volume, _, labels = spleen
    ds = pydicom.dcmread(write_dicom_seg(tmp_path / "seg.dcm", labels, volume, names={1: "spleen"}))
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence
    ds.save_as(tmp_path / "no_refs.dcm")
    np.testing.assert_array_equal(read_labels(tmp_path / "no_refs.dcm", volume), labels)
    ipp = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    ipp[2] = float(ipp[2]) + 2.5  # half a slice off
    ds.save_as(tmp_path / "off.dcm")
    with pytest.raises(LabelMismatchError, match="not the position of any slice"):
        read_labels(tmp_path / "off.dcm", volume)


def test_a_seg_saved_inside_its_series_folder_does_not_hide_the_series(spleen, tmp_path):
    import shutil

    volume, _, labels = spleen
    folder = tmp_path / "series"
    shutil.copytree(volume.source_path, folder)
    reread = read_volume(folder)
    write_dicom_seg(folder / "seg.dcm", labels, reread, names={1: "spleen"})
    again = read_volume(folder)  # two series now (CT + SEG): the SEG is not an image to choose from
    assert again.header["series_uid"] == volume.header["series_uid"] and again.shape == volume.shape
    np.testing.assert_array_equal(read_labels(folder / "seg.dcm", again), labels)


def test_non_dicom_sources_and_incomplete_series_are_refused_with_a_sentence(spleen, sample_dir, tmp_path,
                                                                            write_dicom_series):
    _, nifti, labels = spleen
    with pytest.raises(DicomSegWriteError, match="not a DICOM series.*Open the DICOM series"):
        write_dicom_seg(tmp_path / "seg.dcm", labels, nifti)
    bare = tmp_path / "bare"  # SimpleITK's own export: no Frame of Reference UID
    make_series(write_dicom_series, bare, _sitk_image(sample_dir / SPLEEN / "image.nii.gz"), frame_of_reference=False)
    with pytest.raises(DicomSegWriteError, match=r"no Frame of Reference UID \(0020,0052\)"):
        write_dicom_seg(tmp_path / "seg.dcm", labels, read_volume(bare))
    volume = read_volume(spleen[0].source_path)
    with pytest.raises(DicomSegWriteError, match="label map is empty"):
        write_dicom_seg(tmp_path / "seg.dcm", np.zeros_like(labels), volume)
    assert not list(tmp_path.glob("*.dcm")) and not list(tmp_path.glob(".*"))


def test_cli_refuses_seg_output_before_any_model_work(spleen, sample_dir, tmp_path, write_dicom_series, capsys):
    from medsam_plugin.cli import main

    prompts = sample_dir / "ct_spleen_prompts.json"
    # A model that does not exist: if the SEG check came after model loading, the error would be about the model.
    code = main(["segment", str(sample_dir / SPLEEN / "image.nii.gz"), "--prompts", str(prompts),
                 "--out", str(tmp_path / "seg.dcm"), "--model", "no_such_model"])
    err = capsys.readouterr().err
    assert code == 2 and "not a DICOM series" in err and "no_such_model" not in err
    bare = tmp_path / "bare"
    make_series(write_dicom_series, bare, _sitk_image(sample_dir / SPLEEN / "image.nii.gz"), frame_of_reference=False)
    code = main(["segment", str(bare), "--prompts", str(prompts), "--out", str(tmp_path / "labels.nii.gz"),
                 "--dicom-seg", str(tmp_path / "seg.dcm"), "--model", "no_such_model"])
    err = capsys.readouterr().err
    assert code == 2 and "no Frame of Reference UID" in err
    code = main(["segment", str(spleen[0].source_path), "--prompts", str(prompts), "--out", str(tmp_path / "l.nii.gz"),
                 "--dicom-seg", str(tmp_path / "seg.dcm"), "--seg-type", "1=NotAnOrgan", "--model", "no_such_model"])
    err = capsys.readouterr().err
    assert code == 2 and "'NotAnOrgan' is neither a DICOM CID 7151 term" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare"]


def test_segment_codes_from_names_and_overrides():
    assert [c.meaning for c in segment_property("Spleen")] == ["Anatomical Structure", "Spleen"]
    assert [c.meaning for c in segment_property("kidney_right")] == ["Anatomical Structure", "Kidney"]
    assert [c.meaning for c in segment_property("cyst")] == ["Morphologically Abnormal Structure", "Cyst"]
    assert segment_property("adipose tissue")[0].meaning == "Tissue"  # CID 7191 lists it under Tissue
    assert [c.meaning for c in segment_property("liver tumor 2")] == ["Tissue", "Tissue"]
    assert [c.meaning for c in parse_property("Neoplasm")] == ["Morphologically Abnormal Structure", "Neoplasm"]
    category, type_ = parse_property("Tissue/SCT:12345678:Custom tissue")
    assert (category.meaning, type_.value, type_.scheme_designator) == ("Tissue", "12345678", "SCT")
    with pytest.raises(ValueError, match="not a segmentation category"):
        parse_property("Organs/Spleen")


def test_seg_type_override_is_written(spleen, tmp_path):
    volume, _, labels = spleen
    out = write_dicom_seg(tmp_path / "seg.dcm", labels, volume, names={1: "lesion A"}, properties={1: "Neoplasm"})
    [segment] = pydicom.dcmread(out, stop_before_pixels=True).SegmentSequence
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"


def test_napari_reader_and_writer_speak_dicom_seg(spleen, tmp_path, monkeypatch):
    import shutil

    from medsam_plugin.napari._reader import META_NAMES, META_VOLUME, napari_get_reader
    from medsam_plugin.napari._writer import write_labels

    volume, _, labels = spleen
    case = tmp_path / "case"
    shutil.copytree(volume.source_path, case / "ct")
    [(image_zyx, image_kwargs, kind)] = napari_get_reader(str(case / "ct"))(str(case / "ct"))
    assert kind == "image"
    view = SliceView(image_kwargs["metadata"][META_VOLUME])
    meta = {"metadata": {**image_kwargs["metadata"], META_NAMES: {1: "spleen"}}, "scale": image_kwargs["scale"],
            "translate": image_kwargs["translate"]}
    written = write_labels(str(case / "spleen"), view.to_view(labels), meta)  # napari's save without extension
    assert written[0].endswith("spleen.nii.gz")
    [written] = write_labels(str(case / "spleen.dcm"), view.to_view(labels), meta)
    assert pydicom.dcmread(written, stop_before_pixels=True).SOPClassUID == SEG_SOP_CLASS_UID

    # Opening the SEG (no viewer open): the series is found in the folder beside it, the labels land on it.
    reader = napari_get_reader(written)
    assert reader is not None and reader.__name__ == "read_seg"
    (img, img_kw, img_kind), (lab, lab_kw, lab_kind) = reader(written)
    assert (img_kind, lab_kind) == ("image", "labels")
    np.testing.assert_array_equal(img, image_zyx)
    np.testing.assert_array_equal(lab, view.to_view(labels))
    assert lab_kw["metadata"][META_NAMES] == {1: "spleen"} and lab_kw["scale"] == image_kwargs["scale"]
    napari = pytest.importorskip("napari")
    layer = napari.layers.Labels(lab, **lab_kw)  # the kwargs are valid for napari (no viewer needed)
    assert list(layer.features["name"]) == ["background", "spleen"]

    # With the series already open in the viewer, only the labels layer comes, on that scan's Volume.
    from types import SimpleNamespace

    open_scan = SimpleNamespace(metadata=image_kwargs["metadata"])
    monkeypatch.setattr(napari, "current_viewer", lambda: SimpleNamespace(layers=[open_scan]))
    [(lab2, lab2_kw, kind2)] = reader(written)
    assert kind2 == "labels" and lab2_kw["metadata"][META_VOLUME] is image_kwargs["metadata"][META_VOLUME]
    np.testing.assert_array_equal(lab2, lab)
    monkeypatch.undo()

    with pytest.raises(DicomSegWriteError, match="not linked to a DICOM series"):
        write_labels(str(tmp_path / "loose.dcm"), view.to_view(labels), {"scale": (5.0, 0.8, 0.8)})
    lost = tmp_path / "lost"
    lost.mkdir()
    shutil.copy(written, lost / "seg.dcm")
    with pytest.raises(ImageReadError, match="neither open in napari nor in a folder next to the SEG"):
        napari_get_reader(str(lost / "seg.dcm"))(str(lost / "seg.dcm"))


@pytest.mark.model
def test_real_model_segmentation_saved_as_seg_matches_its_nifti(spleen, sample_dir, tmp_path, lite_medsam,
                                                               embedding_cache_dir):
    """Segment the spleen on the DICOM series with LiteMedSAM; the SEG and the NIfTI hold the same voxels."""
    from medsam_plugin.engine.prompts import load_prompts, parse_prompts
    from medsam_plugin.engine.propagation import run_to_completion
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.evaluation.metrics import dice

    volume, _, truth = spleen
    session = SegmentationSession(volume, loaded_model=lite_medsam, cache_dir=embedding_cache_dir)
    [obj] = parse_prompts(load_prompts(sample_dir / "ct_spleen_prompts.json"), session.view)
    session.add_object(name=obj.name, label_id=obj.label_id)
    for sp in obj.slices.values():
        session.segment_slice(obj.label_id, sp.z, box_xyxy=sp.box_xyxy)
    run_to_completion(session.propagate(obj.label_id, direction=obj.direction))
    [nii] = session.save(tmp_path / "spleen.nii.gz")
    [seg_path] = session.save(tmp_path / "spleen.dcm")  # the Python API picks the SEG writer by suffix
    nifti_labels = read_labels(nii, volume)
    assert dice(nifti_labels == 1, truth == 1) >= 0.85
    seg = highdicom.seg.segread(str(seg_path))
    by_uid = seg.get_pixels_by_source_instance(list(volume.header["sop_instance_uids"]), combine_segments=True,
                                               assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(by_uid.transpose(2, 1, 0), nifti_labels)
    np.testing.assert_array_equal(read_labels(seg_path, volume), nifti_labels)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["spleen"]


@pytest.mark.model
@pytest.mark.slow
def test_cli_writes_the_label_map_and_its_dicom_seg(spleen, sample_dir, tmp_path, embedding_cache_dir):
    """`segment DICOM --out labels.nii.gz --dicom-seg seg.dcm`: both files hold the same voxels."""
    import subprocess
    import sys

    volume = spleen[0]
    out, seg_path = tmp_path / "spleen.nii.gz", tmp_path / "spleen_seg.dcm"
    proc = subprocess.run(
        [sys.executable, "-m", "medsam_plugin.cli", "segment", str(volume.source_path), "--prompts",
         str(sample_dir / "ct_spleen_prompts.json"), "--out", str(out), "--dicom-seg", str(seg_path),
         "--seg-type", "1=Spleen", "--cache-dir", str(embedding_cache_dir)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {seg_path}" in proc.stdout
    nifti_labels = read_labels(out, volume)
    assert nifti_labels.any()
    np.testing.assert_array_equal(read_labels(seg_path, volume), nifti_labels)
    ds = pydicom.dcmread(seg_path, stop_before_pixels=True)
    algo = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    from medsam_plugin.model.defaults import DEFAULT_MODEL

    assert f"model={DEFAULT_MODEL}" in str(algo.AlgorithmParameters)  # the model that made it is named
