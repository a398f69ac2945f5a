"""Fine-tuning data: the MONAI chain's geometry and intensities, and clear errors on bad data."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsam_plugin.training.data import case_transforms, data_errors, load_datalist, slice_pairs, split_pairs
from medsam_plugin.training.transforms import DataError, SimulatePromptsd, mask_to_lowres

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def _write(folder: Path, name: str, image: np.ndarray, label: np.ndarray, affine=None, label_affine=None) -> dict:
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    d = folder / name
    d.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), d / "image.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine if label_affine is None else label_affine),
             d / "label.nii.gz")
    return {"image": f"{name}/image.nii.gz", "label": f"{name}/label.nii.gz"}


def _volume(shape=(20, 18, 6)):
    rng = np.random.default_rng(0)
    image = rng.integers(-200, 200, size=shape)
    label = np.zeros(shape, np.uint8)
    label[5:12, 4:10, 1:5] = 1
    return image, label


def _datalist(tmp_path: Path, items: list, labels=None) -> Path:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": labels or {"0": "background", "1": "organ"}, "modality": {"0": "CT"},
                                "training": items}))
    return path


def _run_chain(cases):
    from monai.data import Dataset

    ds = Dataset(cases, transform=case_transforms(min_area=1))
    with data_errors():
        return [ds[i] for i in range(len(ds))]


def _rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = np.deg2rad(degrees_z), np.deg2rad(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _affine(linear: np.ndarray, origin=(-100.0, 80.0, 30.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, origin
    return affine


# The scans the two implementations of the view (io.SliceView on the stored grid, and the MONAI
# chain's Orientationd("RAS") + ToSliceView) must agree on: RAS, LPS (as DICOM and ITK store them)
# and oblique (tilted 20 and 10 degrees, voxel axes mixed: the nearest axes are used).
SYNTHETIC_AFFINES = {
    "lps": _affine(np.diag([-0.8, -0.8, 2.5])),
    "oblique": _affine(_rotation(20.0, 10.0) @ np.diag([0.8, 0.9, 2.5])),
    "oblique_lps_permuted": _affine((_rotation(-15.0, 25.0) @ np.diag([-0.9, -2.5, 0.8]))[:, [0, 2, 1]]),
}


@pytest.mark.parametrize("scan", ["sample", *SYNTHETIC_AFFINES])
def test_chain_matches_engine_view_and_normalisation(scan, tmp_path):
    """The training view and intensities equal what the engine shows and feeds at inference."""
    from medsam_plugin.engine.preprocessing import normalize_volume
    from medsam_plugin.io import SliceView, read_labels, read_volume

    if scan == "sample":
        case = SAMPLE / "ct_spleen_msd_spleen2_crop"
    else:
        rng = np.random.default_rng(1)
        shape = (22, 17, 9)
        image = rng.integers(-1000, 1000, size=shape)
        label = np.zeros(shape, np.uint8)
        label[4:15, 3:11, 1:8] = 1
        label[6:9, 4:7, 2:6] = 2  # asymmetric, so a wrong flip or transpose shows
        _write(tmp_path, scan, image, label, affine=SYNTHETIC_AFFINES[scan])
        case = tmp_path / scan
    item = {"image": str(case / "image.nii.gz"), "label": str(case / "label.nii.gz"), "case": scan,
            "modality": "CT", "labels_allowed": [0, 1, 2], "objects": [1]}
    out = _run_chain([item])[0]
    volume = read_volume(case / "image.nii.gz")
    view = SliceView(volume, axis="axial")
    expected_u8 = normalize_volume(view.to_view(volume.data_ijk), "CT", None)
    np.testing.assert_array_equal(out["image"], expected_u8)
    np.testing.assert_array_equal(out["label"], view.to_view(read_labels(case / "label.nii.gz", volume)))
    assert sorted(out["slices"]) == [1] and len(out["slices"][1]) > (10 if scan == "sample" else 2)


def test_pairs_and_prompts_in_the_model_frame(tmp_path):
    image, label = _volume()
    dl = _datalist(tmp_path, [_write(tmp_path, "a", image, label)])
    cases = _run_chain(load_datalist(dl))
    cases[0]["embeddings"] = {z: np.zeros((256, 64, 64), np.float16) for z in range(cases[0]["image"].shape[0])}
    pairs = slice_pairs(cases)
    assert all(abs(p.t - p.n) == 1 for p in pairs)
    assert {p.n for p in pairs} == set(cases[0]["slices"][1])  # every neighbour holds the object
    train, val = split_pairs(pairs)
    assert train and val and not set(map(str, train)) & set(map(str, val))
    tf = SimulatePromptsd(cases)
    tf.set_random_state(0)
    sample = tf(pairs[0].as_dict())
    assert sample["target"].shape == (1, 256, 256) and sample["embedding_t"].shape == (256, 64, 64)
    box = sample["box_prop"]
    assert 0 <= box[0] <= box[2] <= 256 and 0 <= box[1] <= box[3] <= 256
    # the propagation box is the neighbour's box (pixel-index corners, as the engine scales them)
    # widened by 3 px at 256 scale
    ys, xs = np.nonzero(sample["nb_mask"][0])
    scale = 256 / max(cases[0]["image"].shape[1:])
    assert xs.min() - 4 <= box[0] <= xs.min() and ys.min() - 4 <= box[1] <= ys.min()
    assert xs.max() + 1 - scale <= box[2] <= xs.max() + 4 and ys.max() + 1 - scale <= box[3] <= ys.max() + 4


def test_mask_to_lowres_matches_engine_geometry():
    from medsam_plugin.engine.preprocessing import SliceGeometry

    mask = np.zeros((100, 50), bool)
    mask[10:90, 5:20] = True
    low = mask_to_lowres(mask, SliceGeometry(100, 50, 256))
    assert low.shape == (256, 256) and low[:, 128:].sum() == 0  # only the left 128 columns hold the slice
    assert abs(low.sum() - mask.sum() * 2.56 ** 2) / (mask.sum() * 2.56 ** 2) < 0.1


def test_missing_file_names_the_case(tmp_path):
    image, label = _volume()
    item = _write(tmp_path, "lost_case", image, label)
    (tmp_path / "lost_case" / "label.nii.gz").unlink()
    with pytest.raises(DataError, match="lost_case.*label file.*does not exist"):
        load_datalist(_datalist(tmp_path, [item]))


def test_shape_mismatch_names_the_case(tmp_path):
    image, label = _volume()
    item = _write(tmp_path, "shapes", image, label[:, :, :5])
    with pytest.raises(DataError, match="Case 'shapes'.*shape"):
        _run_chain(load_datalist(_datalist(tmp_path, [item])))


def test_affine_mismatch_names_the_case(tmp_path):
    image, label = _volume()
    shifted = np.diag([2.0, 2.0, 3.0, 1.0])
    shifted[0, 3] = 10.0
    item = _write(tmp_path, "moved", image, label, label_affine=shifted)
    with pytest.raises(DataError, match="Case 'moved'.*affines"):
        _run_chain(load_datalist(_datalist(tmp_path, [item])))


def test_empty_label_names_the_case(tmp_path):
    image, label = _volume()
    item = _write(tmp_path, "blank", image, np.zeros_like(label))
    with pytest.raises(DataError, match="Case 'blank'.*empty"):
        _run_chain(load_datalist(_datalist(tmp_path, [item])))


def test_undeclared_label_value_names_the_case(tmp_path):
    image, label = _volume()
    label[1:3, 1:3, 1:3] = 7
    item = _write(tmp_path, "extra", image, label)
    with pytest.raises(DataError, match=r"Case 'extra'.*\[7\].*not declare"):
        _run_chain(load_datalist(_datalist(tmp_path, [item])))


def test_objects_must_be_declared(tmp_path):
    image, label = _volume()
    item = _write(tmp_path, "picky", image, label)
    item["objects"] = [3]
    with pytest.raises(DataError, match=r"Case 'picky'.*\[3\]"):
        load_datalist(_datalist(tmp_path, [item]))
