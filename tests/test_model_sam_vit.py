"""SAM ViT-B/L/H encoders: key names and shapes of Meta's / MedSAM's checkpoints, parameter
counts, the relative-position attention against a naive implementation, and a save/load round
trip through ``load_model`` with random weights (the real checkpoints are not available here).
"""

from __future__ import annotations

import math

import pytest
import torch

from medsam_plugin.model import registry
from medsam_plugin.model.registry import find_lite_medsam_weights, load_model
from medsam_plugin.model.sam import build_sam_vit
from medsam_plugin.model.sam_vit import (
    VIT_CONFIGS,
    ImageEncoderViT,
    ViTAttention,
    window_partition,
    window_unpartition,
)

# Parameter totals of Meta's published SAM models (image encoder + prompt encoder + mask decoder).
PUBLISHED_TOTALS = {"vit_b": 93_735_472, "vit_l": 312_342_832, "vit_h": 641_090_608}


def _meta_state(variant: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build_sam_vit(variant).state_dict()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSAM_PLUGIN_CACHE", str(tmp_path / "cache"))


def test_vit_b_keys_and_shapes_match_the_published_checkpoints():
    sd = _meta_state("vit_b")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["image_encoder.pos_embed"] == (1, 64, 64, 768)
    assert shapes["image_encoder.patch_embed.proj.weight"] == (768, 3, 16, 16)
    assert shapes["image_encoder.patch_embed.proj.bias"] == (768,)
    for i in range(12):
        rel = (127, 64) if i in (2, 5, 8, 11) else (27, 64)
        assert shapes[f"image_encoder.blocks.{i}.attn.rel_pos_h"] == rel
        assert shapes[f"image_encoder.blocks.{i}.attn.rel_pos_w"] == rel
        assert shapes[f"image_encoder.blocks.{i}.attn.qkv.weight"] == (2304, 768)
        assert shapes[f"image_encoder.blocks.{i}.attn.proj.weight"] == (768, 768)
        assert shapes[f"image_encoder.blocks.{i}.norm1.weight"] == (768,)
        assert shapes[f"image_encoder.blocks.{i}.mlp.lin1.weight"] == (3072, 768)
        assert shapes[f"image_encoder.blocks.{i}.mlp.lin2.weight"] == (768, 3072)
    assert "image_encoder.blocks.12.norm1.weight" not in shapes
    assert shapes["image_encoder.neck.0.weight"] == (256, 768, 1, 1)
    assert shapes["image_encoder.neck.1.weight"] == (256,)
    assert shapes["image_encoder.neck.2.weight"] == (256, 256, 3, 3)
    assert shapes["image_encoder.neck.3.bias"] == (256,)
    assert "image_encoder.neck.0.bias" not in shapes
    assert not any("pixel_mean" in k or "pixel_std" in k for k in shapes)  # not persistent in SAM either

    # SAM's prompt encoder and mask decoder are the same modules as LiteMedSAM's.
    lite = torch.load(find_lite_medsam_weights(), map_location="cpu", weights_only=True)
    lite_heads = {k: tuple(v.shape) for k, v in lite.items() if not k.startswith("image_encoder.")}
    assert {k: v for k, v in shapes.items() if not k.startswith("image_encoder.")} == lite_heads
    with torch.device("meta"):
        assert sum(p.numel() for p in build_sam_vit("vit_b").parameters()) == PUBLISHED_TOTALS["vit_b"]


@pytest.mark.parametrize("variant", ["vit_l", "vit_h"])
def test_vit_l_h_configs(variant):
    cfg = VIT_CONFIGS[variant]
    with torch.device("meta"):
        sam = build_sam_vit(variant)
    sd = sam.state_dict()
    head_dim = cfg.embed_dim // cfg.num_heads
    assert tuple(sd["image_encoder.pos_embed"].shape) == (1, 64, 64, cfg.embed_dim)
    for i in range(cfg.depth):
        rel = (127, head_dim) if i in cfg.global_attn_indexes else (27, head_dim)
        assert tuple(sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape) == rel
    assert f"image_encoder.blocks.{cfg.depth}.norm1.weight" not in sd
    assert sum(p.numel() for p in sam.parameters()) == PUBLISHED_TOTALS[variant]


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_encoder_parameter_count_arithmetic(variant):
    cfg = VIT_CONFIGS[variant]
    d, hd = cfg.embed_dim, cfg.embed_dim // cfg.num_heads
    per_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    rel_pos = sum(2 * (2 * (64 if i in cfg.global_attn_indexes else 14) - 1) * hd for i in range(cfg.depth))
    expected = (
        (3 * 16 * 16 * d + d)  # patch embedding
        + 64 * 64 * d  # absolute position embedding
        + cfg.depth * per_block
        + rel_pos
        + (256 * d + 2 * 256 + 256 * 256 * 9 + 2 * 256)  # neck
    )
    with torch.device("meta"):
        encoder = build_sam_vit(variant).image_encoder
    assert sum(p.numel() for p in encoder.parameters()) == expected


def _naive_rel_pos_attention(attn: ViTAttention, x: torch.Tensor) -> torch.Tensor:
    """Explicit per-pair relative position bias, written independently of the module."""
    b, h, w, c = x.shape
    heads, d = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x.reshape(b, h * w, c)).reshape(b, h * w, 3, heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, HW, heads, d)
    pos = [(i, j) for i in range(h) for j in range(w)]
    bias = torch.zeros(b, heads, h * w, h * w)
    for a, (qi, qj) in enumerate(pos):
        for e, (ki, kj) in enumerate(pos):
            rh = attn.rel_pos_h[qi - ki + h - 1]
            rw = attn.rel_pos_w[qj - kj + w - 1]
            bias[:, :, a, e] = (q[:, a] * rh).sum(-1) + (q[:, a] * rw).sum(-1)
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d) + bias
    out = torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v).reshape(b, h, w, c)
    return attn.proj(out)


def test_relative_position_attention_matches_a_naive_version():
    torch.manual_seed(0)
    attn = ViTAttention(dim=32, num_heads=2, input_size=(5, 6))
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
        x = torch.randn(2, 5, 6, 32)
        assert torch.allclose(attn(x), _naive_rel_pos_attention(attn, x), atol=1e-5)


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 64, 64, 8)
    windows, padded = window_partition(x, 14)
    assert padded == (70, 70) and windows.shape == (2 * 25, 14, 14, 8)
    assert torch.equal(windows[1], x[0, :14, 14:28])
    assert torch.equal(window_unpartition(windows, 14, padded, (64, 64)), x)
    assert torch.count_nonzero(windows[24, 8:, :]) == 0  # bottom-right window: zero padding


def test_small_vit_forward_shape():
    torch.manual_seed(0)
    enc = ImageEncoderViT(img_size=256, embed_dim=64, depth=3, num_heads=2, window_size=7, global_attn_indexes=(1,))
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 256, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"expects a 256x256 input"):
        enc(torch.randn(1, 3, 128, 128))


def test_vit_b_save_load_round_trip(tmp_path):
    with torch.device("meta"):
        sam = build_sam_vit("vit_b")
    sam = sam.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in sam.state_dict().values():
            if t.is_floating_point():
                t.uniform_(-0.05, 0.05, generator=gen)
    # Half precision keeps the file small; the loader converts to float32.
    state = {k: v.half() if v.is_floating_point() else v for k, v in sam.state_dict().items()}
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(state, path)

    loaded = load_model(path, device="cpu")
    spec = loaded.spec
    assert (spec.family, spec.base, spec.image_size, spec.normalization) == ("vit_b", "sam_vit_b", 1024, "sam_imagenet")
    got = loaded.sam.state_dict()
    assert set(got) == set(state)
    for key in ("image_encoder.pos_embed", "image_encoder.blocks.2.attn.rel_pos_h", "mask_decoder.iou_token.weight"):
        assert got[key].dtype == torch.float32 and torch.equal(got[key], state[key].float())
    assert loaded.sam.prompt_encoder.input_image_size == (1024, 1024)

    # MedSAM's file: by name with checkpoint=..., or by a path named like MedSAM's file.
    medsam = tmp_path / "medsam_vit_b.pth"
    medsam.symlink_to(path)
    explicit = load_model("medsam_vit_b", device="cpu", checkpoint=medsam)
    assert (explicit.spec.name, explicit.spec.normalization, explicit.spec.image_size) == ("medsam_vit_b", "minmax01", 1024)
    assert registry._spec_for_file("vit_b", medsam).normalization == "minmax01"
    assert registry._spec_for_file("vit_h", tmp_path / "x.pth").base == "sam_vit_h"
