"""The command line: the quick-start job on the shipped CT, evaluation, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medsam_plugin.cli import main
from medsam_plugin.evaluation.metrics import dice

SPLEEN = "ct_spleen_msd_spleen2_crop"


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "medsam_plugin.cli", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.model
@pytest.mark.slow
def test_segment_writes_an_aligned_label_map_overlay_and_sidecars(sample_dir, tmp_path, embedding_cache_dir):
    out = tmp_path / "spleen.nii.gz"
    code, stdout, stderr = run_cli(
        "segment", sample_dir / SPLEEN / "image.nii.gz", "--prompts", sample_dir / "ct_spleen_prompts.json",
        "--out", out, "--png", tmp_path / "overlay.png", "--cache-dir", embedding_cache_dir,
        "--reference", sample_dir / SPLEEN / "label.nii.gz")
    assert code == 0, stderr
    source = nib.load(sample_dir / SPLEEN / "image.nii.gz")
    written = nib.load(out)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert written.get_data_dtype() == np.uint8
    truth = np.asarray(nib.load(sample_dir / SPLEEN / "label.nii.gz").dataobj) == 1
    assert dice(np.asarray(written.dataobj) == 1, truth) >= 0.88
    assert "Dice spleen" in stdout
    sidecar = json.loads((tmp_path / "spleen.labels.json").read_text())
    assert [entry["name"] for entry in sidecar["labels"]] == ["spleen"]
    assert (tmp_path / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.model
@pytest.mark.slow
def test_evaluate_a_decathlon_datalist_with_corrective_clicks(sample_dir, tmp_path, capsys, embedding_cache_dir):
    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps({"labels": {"0": "background", "1": "spleen"}, "validation": [
        {"image": f"{SPLEEN}/image.nii.gz", "label": f"{SPLEEN}/label.nii.gz"}]}))
    report_path = tmp_path / "report.json"
    code = main(["evaluate", str(datalist), "--data-root", str(sample_dir), "--clicks", "1",
                 "--json", str(report_path), "--cache-dir", str(embedding_cache_dir)])
    assert code == 0
    report = json.loads(report_path.read_text())
    (obj,) = report["objects"]
    assert obj["label"] == 1 and obj["dice"] >= 0.88 and 0 < obj["nsd"] <= 1
    assert obj["clicks"] == 1 and len(obj["dice_per_round"]) == 2 and obj["slices_prompted"] >= 1
    assert report["mean_dice"] == pytest.approx(obj["dice"])
    # A lone object: its own result is what the label map holds.
    assert obj["dice_own"] == obj["dice"] and report["mean_dice_own"] == pytest.approx(report["mean_dice"])
    assert "mean" in capsys.readouterr().out


def _nifti(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"objects": [{"id": 1, "points": [[2, 2, 2]]}]}))
    return path


@pytest.mark.parametrize("make_image, message", [
    (lambda d: d.joinpath("x.nii.gz").write_bytes(b"not a nifti at all" * 10) and d / "x.nii.gz", "x.nii.gz"),
    (lambda d: _nifti(d / "flat.nii.gz", np.zeros((8, 8), np.float32)), "2D"),
    (lambda d: _nifti(d / "movie.nii.gz", np.zeros((8, 8, 8, 3), np.float32)), "4D"),
    (lambda d: _nifti(d / "nan.nii.gz", np.full((8, 8, 8), np.nan, np.float32)), "NaN"),
])
def test_bad_images_exit_2_with_a_sentence_and_write_nothing(tmp_path, prompts, make_image, message):
    image = make_image(tmp_path)
    out = tmp_path / "out" / "labels.nii.gz"
    out.parent.mkdir()
    code, _, stderr = run_cli("segment", image, "--prompts", prompts, "--out", out)
    assert code == 2 and message in stderr and stderr.startswith("error: ")
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("doc, message", [
    ({"objects": []}, "no objects"),
    ({"objects": [{"id": 1, "points": [[200, 2, 2]]}]}, "outside the volume"),
])
def test_bad_prompts_exit_2(tmp_path, doc, message):
    image = _nifti(tmp_path / "img.nii.gz", np.zeros((8, 8, 8), np.float32))
    (tmp_path / "p.json").write_text(json.dumps(doc))
    code, _, stderr = run_cli("segment", image, "--prompts", tmp_path / "p.json", "--out", tmp_path / "o.nii.gz")
    assert code == 2 and message in stderr
    assert not (tmp_path / "o.nii.gz").exists()


def test_unwritable_output_path_fails_before_any_model_work(tmp_path, prompts):
    image = _nifti(tmp_path / "img.nii.gz", np.zeros((8, 8, 8), np.float32))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, stderr = run_cli("segment", image, "--prompts", prompts, "--out", blocker / "labels.nii.gz")
    assert code == 2 and "not an existing folder" in stderr


def test_models_lists_the_registry():
    code, stdout, _ = run_cli("models")
    from medsam_plugin.model.defaults import DEFAULT_MODEL

    assert code == 0 and f"{DEFAULT_MODEL}  (default)" in stdout and "sam_vit_h" in stdout and "lite_medsam" in stdout
