"""Issue 21.6: the window a CT opens in is chosen from the scan (`engine.preprocessing.choose_window`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsam_plugin.engine.preprocessing import LUNG_WINDOW_SHARE, aerated_lung_share, choose_window
from medsam_plugin.io import read_labels, read_volume
from medsam_plugin.io.orientation import SliceView


def view_of(path):
    volume = read_volume(path)
    return volume, SliceView(volume, axis="axial").to_view(volume.data_ijk)


def test_a_lung_ct_from_real_data_gets_the_lung_window(shared_data_dir):
    """The TotalSegmentator CT's lung slices (its lung bases, the most lung the shared data holds) open in
    the lung window; the whole scan, an abdomen CT that catches the lung bases, in the abdomen window."""
    case = shared_data_dir / "ct_abdomen_totalseg_sm"
    volume, image = view_of(case / "image.nii.gz")
    truth = SliceView(volume, axis="axial").to_view(read_labels(case / "label.nii.gz", volume))
    lung_slices = np.nonzero(np.isin(truth, [10, 11, 12, 13, 14]).sum(axis=(1, 2)) >= 400)[0]
    lung_ct = image[lung_slices.min(): lung_slices.max() + 1]
    name, why = choose_window(lung_ct, "CT")
    assert name == "lung" and "aerated lung" in why
    assert choose_window(image, "CT")[0] == "abdomen"
    assert aerated_lung_share(image) < LUNG_WINDOW_SHARE / 2  # not near the line


def test_abdomen_and_limb_cts_keep_the_abdomen_window(sample_dir, shared_data_dir):
    _, spleen = view_of(sample_dir / "ct_spleen_msd_spleen2_crop" / "image.nii.gz")
    assert choose_window(spleen, "CT")[0] == "abdomen"
    lesions = shared_data_dir.parent / "lesions"
    if not (lesions / "manifest.json").is_file():
        pytest.skip("../shared/lesions is absent")
    cases = [c["id"] for c in json.loads((lesions / "manifest.json").read_text())["cases"] if c["modality"] == "CT"]
    shares = {c: aerated_lung_share(view_of(lesions / c / "image.nii.gz")[1]) for c in cases}
    assert max(shares.values()) < LUNG_WINDOW_SHARE / 4, shares  # limbs: air around them is not lung


def test_mr_and_synthetic_edges():
    assert choose_window(np.zeros((4, 8, 8), np.float32), "MR")[0] == "mr"
    air = np.full((4, 40, 40), -1000.0, np.float32)
    assert choose_window(air, "CT")[0] == "abdomen"  # no body at all
    chest = air.copy()
    chest[:, 5:35, 5:35] = 40.0  # a body...
    chest[:, 10:30, 8:19] = -800.0  # ...with two lungs inside
    chest[:, 10:30, 21:32] = -800.0
    assert choose_window(chest, "CT")[0] == "lung"
    gas = air.copy()
    gas[:, 5:35, 5:35] = 40.0
    gas[:, 18:22, 18:22] = -1000.0  # bowel gas is air, not lung
    assert choose_window(gas, "CT")[0] == "abdomen"
