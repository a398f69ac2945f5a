"""The shipped interactive model (medsam_interactive) on the real spleen sample, real weights.

It must load with its checksum checked, answer one click, improve with corrections, and the
evaluation protocols that measure it must give their JSON fields.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SPLEEN = REPO / "sample_data" / "ct_spleen_msd_spleen2_crop"
SARCOMA = REPO / "sample_data" / "mr_sarcoma_ibsi_sts_032"

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def interactive():
    from medsam_plugin.model.registry import load_model

    return load_model("medsam_interactive", device="cpu")


def test_shipped_weights_load_with_their_checksum(tmp_path, monkeypatch):
    from medsam_plugin.model import registry
    from medsam_plugin.model.errors import ModelLoadError

    spec = registry.REGISTRY["medsam_interactive"]
    path = registry.packaged_weights_dir() / registry.INTERACTIVE_FILE
    assert spec.sha256 and registry.file_sha256(path, use_cache=False) == spec.sha256
    assert spec.prompts == ("box", "points", "mask") and spec.base == "lite_medsam"
    # the same file with one byte changed must be refused, naming the model
    bad_dir = tmp_path / "weights"
    bad_dir.mkdir()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad_dir / registry.INTERACTIVE_FILE).write_bytes(bytes(data))
    monkeypatch.setattr(registry, "packaged_weights_dir", lambda: bad_dir)
    with pytest.raises(ModelLoadError, match="medsam_interactive"):
        registry.load_model("medsam_interactive", device="cpu")


def test_it_shares_the_stock_encoder_embeddings(interactive, lite_medsam):
    import torch

    assert interactive.spec.embedding_key == lite_medsam.spec.embedding_key
    for a, b in zip(interactive.sam.image_encoder.state_dict().values(), lite_medsam.sam.image_encoder.state_dict().values()):
        assert torch.equal(a, b)


def _spleen_session(loaded, cache_dir):
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import read_labels, read_volume

    volume = read_volume(SPLEEN / "image.nii.gz")
    session = SegmentationSession(volume, loaded_model=loaded, cache_dir=cache_dir)
    truth = session.view.to_view(read_labels(SPLEEN / "label.nii.gz", volume)) == 1
    return session, truth


def test_one_click_segments_the_spleen(interactive, embedding_cache_dir):
    from medsam_plugin.engine.propagation import interior_point_yx
    from medsam_plugin.evaluation.metrics import dice

    session, truth = _spleen_session(interactive, embedding_cache_dir)
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    session.add_object("spleen", label_id=1)
    pred = session.segment_slice(1, z, points_yx=interior_point_yx(truth[z])[None], point_labels=np.array([1]))
    assert dice(pred.mask_yx, truth[z]) >= 0.85


def test_a_lone_click_is_refined_with_its_own_answer(interactive, embedding_cache_dir):
    """Cascaded refinement: the click's first answer goes back as a dense prompt (2 passes here),
    which answers the spleen better than the single pass; a box is answered in one pass."""
    import dataclasses

    from medsam_plugin.engine.propagation import bounding_box_xyxy, interior_point_yx
    from medsam_plugin.evaluation.metrics import dice

    assert interactive.spec.click_refine_passes == 2
    session, truth = _spleen_session(interactive, embedding_cache_dir)
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    session.add_object("spleen", label_id=1)
    click = dict(points_yx=interior_point_yx(truth[z])[None], point_labels=np.array([1]))
    before = session.predictor.decode_count
    refined = session.segment_slice(1, z, **click)
    assert session.predictor.decode_count - before == 3
    assert refined.prompt["mask"] is False  # the slice remembers the user's prompt, not the passes
    single = session.predictor.predict(z, multimask=False, **click)
    assert dice(refined.mask_yx, truth[z]) > dice(single.mask_yx, truth[z])
    before = session.predictor.decode_count
    session.segment_slice(1, z, box_xyxy=bounding_box_xyxy(truth[z]))
    assert session.predictor.decode_count - before == 1
    # A model with no passes declared answers a click in one decode.
    session.predictor.spec = dataclasses.replace(interactive.spec, click_refine_passes=0)
    before = session.predictor.decode_count
    session.segment_slice(1, z, **click)
    assert session.predictor.decode_count - before == 1


def test_three_corrections_never_lower_the_spleen_dice(interactive, embedding_cache_dir):
    """The simulated expert's three clicks (the challenge's 3D rule). On the spleen its largest
    error is a thin rim the walk put round the organ; the clicks there may change little, but
    they must not make it worse."""
    from medsam_plugin.evaluation.simulate import simulate_object

    session, truth = _spleen_session(interactive, embedding_cache_dir)
    score = simulate_object(session, truth, 1, name="spleen", clicks=3)
    rounds = score.dice_per_round
    assert len(rounds) == 4 and rounds[0] >= 0.85
    assert all(b >= a - 1e-3 for a, b in zip(rounds, rounds[1:])), rounds


def test_clicks_on_the_worst_propagated_slice_correct_it(interactive, embedding_cache_dir):
    """Three clicks, each at the centre of the slice's largest error region, on the propagated
    slice with the most wrong pixels (of those the walk reached): the first click raises its Dice
    and none leaves it below where it started."""
    from medsam_plugin.engine.propagation import (bounding_box_xyxy, interior_point_yx, largest_error_region,
                                                  run_to_completion)
    from medsam_plugin.evaluation.metrics import dice

    session, truth = _spleen_session(interactive, embedding_cache_dir)
    session.add_object("spleen", label_id=1)
    z0 = int(np.argmax(truth.sum(axis=(1, 2))))
    session.segment_slice(1, z0, box_xyxy=bounding_box_xyxy(truth[z0]))
    run_to_completion(session.propagate(1))
    pred = session.labels.array == 1
    errors = np.where(pred.any(axis=(1, 2)) & truth.any(axis=(1, 2)), (pred ^ truth).sum(axis=(1, 2)), 0)
    errors[z0] = 0
    z = int(np.argmax(errors))
    points, kinds, scores = [], [], [dice(pred[z], truth[z])]
    current = pred[z]
    for _ in range(3):
        region, kind = largest_error_region(truth[z], current)
        points.append(interior_point_yx(region))
        kinds.append(kind)
        current = session.segment_slice(1, z, points_yx=np.array(points), point_labels=np.array(kinds),
                                        use_current_mask=True).mask_yx
        scores.append(dice(current, truth[z]))
    # Measured 0.944 0.953 0.952 0.952: later clicks on a slice this good move it by a thousandth.
    assert scores[1] >= scores[0] + 0.005 and min(scores[1:]) > scores[0], scores


def test_one_click_segments_the_sample_sarcoma_in_3d(tmp_path, embedding_cache_dir):
    """The README's lesion example, as a user runs it: one click on the thigh sarcoma (a validation
    patient, never trained on), propagated. Measured 0.786 with the lesion-trained model; the
    organ-trained v1 gave 0.040 (its walk stopped on the clicked slice)."""
    import re

    cmd = [sys.executable, "-m", "medsam_plugin.cli", "segment", str(SARCOMA / "image.nii.gz"),
           "--prompts", str(REPO / "sample_data" / "mr_sarcoma_click.json"), "--out", str(tmp_path / "t.nii.gz"),
           "--reference", str(SARCOMA / "label.nii.gz"), "--cache-dir", str(embedding_cache_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"Dice tumour \(label 1\) vs reference: ([0-9.]+)", done.stdout + done.stderr)
    assert found, done.stdout[-2000:]
    assert float(found.group(1)) >= 0.75


def test_protocols_and_their_json_fields(tmp_path, embedding_cache_dir):
    reports = {}
    for protocol in ("click", "box3d"):
        out = tmp_path / f"{protocol}.json"
        cmd = [sys.executable, "-m", "medsam_plugin.cli", "evaluate", str(SPLEEN / "image.nii.gz"),
               str(SPLEEN / "label.nii.gz"), "--model", "medsam_interactive", "--protocol", protocol,
               "--clicks", "2", "--cache-dir", str(embedding_cache_dir), "--json", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        reports[protocol] = json.loads(out.read_text())
    for protocol, report in reports.items():
        assert report["protocol"] == protocol
        assert "3D error" in report["click_rule"]  # reports name the click rule they were measured with
        obj = report["objects"][0]
        for key in ("seed_dice", "dice_per_round", "nsd_per_round", "dsc_auc", "nsd_auc", "span"):
            assert key in obj, key
        assert len(obj["dice_per_round"]) == len(obj["nsd_per_round"]) == 3
        # The challenge's area: over the click rounds only (the first prompt's round left out).
        assert obj["dsc_auc"] == pytest.approx((obj["dice_per_round"][1] + obj["dice_per_round"][2]) / 2)
        assert obj["seed_dice"] >= 0.85
    span = reports["box3d"]["objects"][0]["span"]
    lo, hi = span["truth_range"]
    assert lo <= span["pred_range"][0] and span["pred_range"][1] <= hi  # box3d never leaves the label's extent


def test_the_box_only_model_is_flagged_as_such():
    from medsam_plugin.model.registry import REGISTRY

    assert not REGISTRY["lite_medsam"].reads_points and not REGISTRY["lite_medsam"].reads_masks
    assert REGISTRY["medsam_interactive"].reads_points and REGISTRY["medsam_interactive"].reads_masks


def test_a_correction_asks_the_decoder_once(interactive, embedding_cache_dir, monkeypatch):
    """Issue 21: a corrective click asked the decoder three or four times, one after the other;
    its ways of asking now share one decoder call (benchmarks/correction_latency.py times it)."""
    from medsam_plugin.engine.propagation import bounding_box_xyxy, interior_point_yx
    from medsam_plugin.model.fast_decoder import FastMaskDecoder

    session, truth = _spleen_session(interactive, embedding_cache_dir)
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    session.add_object("spleen", label_id=1)
    session.segment_slice(1, z, box_xyxy=bounding_box_xyxy(truth[z]))
    runs = []
    for name in ("decode", "decode_batch"):
        original = getattr(FastMaskDecoder, name)
        monkeypatch.setattr(FastMaskDecoder, name,
                            lambda self, *a, _f=original, _n=name, **k: (runs.append(_n), _f(self, *a, **k))[1])
    fg = interior_point_yx(truth[z])
    for points, labels in (([fg], [1]), ([fg, [5.0, 5.0]], [1, 0])):  # three ways, then four
        runs.clear()
        calls = session.predictor.decoder_calls
        pred = session.segment_slice(1, z, points_yx=np.array(points), point_labels=np.array(labels),
                                     use_current_mask=True, commit=False)
        assert runs == ["decode_batch"] and session.predictor.decoder_calls - calls == 1
        assert pred.mask_yx[int(fg[0]), int(fg[1])]
