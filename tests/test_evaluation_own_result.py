"""Evaluation scores each object twice: in the label map (the first object to claim a voxel keeps
it) and on its own result (the masks the engine returned for it). Real LiteMedSAM weights, on the
shipped spleen CT cut down to the spleen's upper slices and the two empty ones above it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from medsam_plugin.cli import main
from medsam_plugin.engine.propagation import LEGACY_POLICY, StopRules
from medsam_plugin.engine.session import SegmentationSession
from medsam_plugin.evaluation.metrics import dice, normalized_surface_dice
from medsam_plugin.evaluation.simulate import simulate_object
from medsam_plugin.io import read_labels, read_volume

pytestmark = pytest.mark.model

SPLEEN = "ct_spleen_msd_spleen2_crop"
K_RANGE = (11, 25)  # axial slices kept: the spleen occupies k 3-22 of the 26, so 23 and 24 are empty


@pytest.fixture(scope="module")
def spleen_top(sample_dir, tmp_path_factory):
    """(image path, label path) of the spleen CT cut to K_RANGE (same affine, so the same voxels)."""
    folder = tmp_path_factory.mktemp("spleen_top")
    paths = []
    for name in ("image.nii.gz", "label.nii.gz"):
        img = nib.load(sample_dir / SPLEEN / name)
        nib.save(img.slicer[:, :, K_RANGE[0]:K_RANGE[1]], folder / name)
        paths.append(folder / name)
    return tuple(paths)


def open_session(image_path, label_path, lite_medsam, cache_dir):
    volume = read_volume(image_path)
    session = SegmentationSession(volume, loaded_model=lite_medsam, cache_dir=cache_dir)
    return session, session.view.to_view(read_labels(label_path, volume))


def core_of(mask_zyx: np.ndarray, iterations: int = 4) -> np.ndarray:
    """The mask shrunk in-plane on every slice: a structure nested inside it."""
    return np.stack([binary_erosion(m, iterations=iterations) for m in mask_zyx])


def test_a_lone_object_scores_the_same_in_the_label_map_and_on_its_own(spleen_top, lite_medsam, embedding_cache_dir):
    session, truth = open_session(*spleen_top, lite_medsam, embedding_cache_dir)
    spleen = truth == 1
    assert not spleen[-1].any()  # the walk can run past the spleen's end, so a "stop here" can come
    # The rule before issue 10 walks on past the spleen's top (the default policy stops there), so
    # the expert's "stop here" path runs too.
    score = simulate_object(session, spleen, 1, clicks=3, stop=StopRules(policy=LEGACY_POLICY))
    # Both correction paths ran ("stop here", and clicks whose re-propagation redoes neighbouring
    # slices on this cut), so the own-result record had to follow each of them.
    assert session.stop_slices.get(1) and len(session.seeds[1]) >= 2, (session.stop_slices, session.seeds[1])
    assert score.clicks == 3 and score.dice > 0.85, score
    assert score.dice == pytest.approx(dice(session.labels.array == 1, spleen), abs=1e-6)
    assert score.dice_own == score.dice and score.nsd_own == score.nsd
    assert score.as_dict()["dice_own"] == score.dice_own and "nsd_own" in score.as_dict()


def test_a_later_object_inside_an_earlier_one_is_scored_on_its_own_masks(spleen_top, lite_medsam,
                                                                        embedding_cache_dir):
    session, truth = open_session(*spleen_top, lite_medsam, embedding_cache_dir)
    spleen = truth == 1
    core = core_of(spleen)  # nested truths: the core is also spleen, as tumour core is also tumour
    first = simulate_object(session, core, 1, name="core")
    later = simulate_object(session, spleen, 2, name="spleen")
    spacing = session.view.view_spacing
    # The first object had the volume to itself.
    assert first.dice_own == first.dice and first.nsd_own == first.nsd
    # The label map scores what the spleen kept after the core's claims: unchanged meaning.
    kept = session.labels.array == 2
    assert later.dice == pytest.approx(dice(kept, spleen), abs=1e-6)
    assert later.nsd == pytest.approx(normalized_surface_dice(kept, spleen, spacing), abs=1e-6)
    # The core's own result covers most of the spleen, so the spleen keeps little of its own.
    assert later.dice_own > later.dice + 0.3, (later.dice, later.dice_own)
    assert later.nsd_own > later.nsd, (later.nsd, later.nsd_own)
    # Its own result is exactly the spleen segmented alone (same prompts, same cached embeddings).
    alone_session, _ = open_session(*spleen_top, lite_medsam, embedding_cache_dir)
    alone = simulate_object(alone_session, spleen, 2, name="spleen")
    alone_mask = alone_session.labels.array == 2
    assert alone.dice == pytest.approx(dice(alone_mask, spleen), abs=1e-6)
    assert later.dice_own == pytest.approx(alone.dice, abs=1e-6)
    assert later.nsd_own == pytest.approx(alone.nsd, abs=1e-6)
    # What the spleen kept is its own result less the voxels the core claimed first.
    assert np.array_equal(kept, alone_mask & (session.labels.array != 1))


def test_evaluate_reports_and_prints_own_scores_for_a_nested_label_map(spleen_top, lite_medsam, tmp_path, capsys,
                                                                       embedding_cache_dir):
    image_path, label_path = spleen_top
    source = nib.load(label_path)
    spleen = np.asarray(source.dataobj) == 1
    core = np.stack([binary_erosion(spleen[:, :, k], iterations=4) for k in range(spleen.shape[2])], axis=2)
    # Disjoint labels around a nested structure, as BraTS writes oedema around the tumour core.
    nested = np.where(core, 1, np.where(spleen, 2, 0)).astype(np.uint8)
    assert (nested == 2).sum() < (nested == 1).sum()  # the rim is smaller, so it is segmented first
    nested_path = tmp_path / "nested.nii.gz"
    nib.save(nib.Nifti1Image(nested, source.affine), nested_path)
    report_path = tmp_path / "report.json"
    code = main(["evaluate", str(image_path), str(nested_path), "--json", str(report_path),
                 "--device", "cpu", "--cache-dir", str(embedding_cache_dir)])
    assert code == 0
    report = json.loads(report_path.read_text())
    core_score, rim_score = report["objects"]  # sorted by label
    assert (core_score["label"], rim_score["label"]) == (1, 2)
    # The rim's box is the spleen's, so its own result covers the core, which then keeps little.
    assert rim_score["dice_own"] == rim_score["dice"]
    assert core_score["dice_own"] > core_score["dice"] + 0.3, core_score
    assert report["mean_dice_own"] == pytest.approx((core_score["dice_own"] + rim_score["dice_own"]) / 2)
    assert report["mean_nsd_own"] == pytest.approx((core_score["nsd_own"] + rim_score["nsd_own"]) / 2)
    assert report["mean_dice_own"] > report["mean_dice"]
    out = capsys.readouterr().out
    assert "dice own" in out and f"{core_score['dice_own']:8.3f}" in out and f"{report['mean_dice_own']:8.3f}" in out


def test_nsd_is_monais_compute_surface_dice_without_its_warning():
    """Issue 21: MONAI's compute_surface_dice warns on every call (it passes get_mask_edges an argument
    deprecated until 1.7). The NSD here is built from MONAI's edges and distances: the same numbers,
    and no warning."""
    import warnings

    import torch
    from monai.metrics import compute_surface_dice

    from medsam_plugin.evaluation.metrics import normalized_surface_dice

    rng = np.random.default_rng(0)
    for i, spacing in enumerate([(1.0, 1.0, 1.0), (5.0, 0.8, 0.8), (2.5, 1.5, 1.0)]):
        a = np.zeros((20, 30, 25), bool)
        b = np.zeros_like(a)
        a[3:15, 5:20, 4:18] = True
        b[4 + i:16, 6:21 - i, 3:17] = True
        a ^= rng.random(a.shape) > 0.97
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = normalized_surface_dice(a, b, spacing, 2.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            p = torch.as_tensor(np.stack([~a, a]))[None].float()
            t = torch.as_tensor(np.stack([~b, b]))[None].float()
            monai = float(compute_surface_dice(p, t, class_thresholds=[2.0], include_background=False,
                                               spacing=list(spacing)).item())
        assert ours == pytest.approx(monai, abs=1e-6) and 0.3 < ours < 0.95
