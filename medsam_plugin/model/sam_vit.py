"""SAM's plain ViT image encoder (ViT-B / ViT-L / ViT-H), as in Meta's Segment Anything.

Input (B, 3, 1024, 1024) -> 16x16 patches -> 64x64 tokens plus an absolute position embedding;
transformer blocks with windowed attention (14x14 windows, zero padding to 70x70) except a few
global-attention blocks; every attention adds decomposed relative position biases (separate
tables for the row and the column offset); a conv neck maps to 256 channels -> (B, 256, 64, 64).

Parameter names follow Meta's checkpoints (``image_encoder.pos_embed``,
``blocks.N.attn.rel_pos_h``, ``neck.0.weight``...) so ``sam_vit_{b,l,h}_*.pth`` and MedSAM's
``medsam_vit_b.pth`` load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock


@dataclass(frozen=True)
class ViTConfig:
    """Size of one SAM ViT variant."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]


VIT_CONFIGS: dict[str, ViTConfig] = {
    "vit_b": ViTConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": ViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": ViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def _relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather the (q_size, k_size, C) bias rows for every query/key offset along one axis.

    ``rel_pos`` holds 2*max(q, k)-1 rows, one per offset; if it was trained for another size it
    is resized linearly along the offset axis first.
    """
    n_offsets = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != n_offsets:
        rel_pos = (
            F.interpolate(rel_pos.T.unsqueeze(0), size=n_offsets, mode="linear")
            .squeeze(0)
            .T
        )
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_pos = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_pos = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    offsets = (q_pos - k_pos) + (k_size - 1) * k_scale  # (q, k), all >= 0
    return rel_pos[offsets.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_hw: tuple[int, int],
    k_hw: tuple[int, int],
) -> torch.Tensor:
    """Additive attention bias from decomposed relative positions.

    q: (B*heads, qh*qw, C) unscaled queries -> bias (B*heads, qh*qw, kh*kw).
    """
    qh, qw = q_hw
    kh, kw = k_hw
    table_h = _relative_position_table(qh, kh, rel_pos_h)  # (qh, kh, C)
    table_w = _relative_position_table(qw, kw, rel_pos_w)  # (qw, kw, C)
    bq = q.shape[0]
    q_grid = q.reshape(bq, qh, qw, -1)
    bias_h = torch.einsum("bhwc,hkc->bhwk", q_grid, table_h)  # (B, qh, qw, kh)
    bias_w = torch.einsum("bhwc,wkc->bhwk", q_grid, table_w)  # (B, qh, qw, kw)
    bias = bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]  # (B, qh, qw, kh, kw)
    return bias.reshape(bq, qh * qw, kh * kw)


class ViTAttention(nn.Module):
    """Multi-head self-attention on a (B, H, W, C) grid with decomposed relative positions."""

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int], use_rel_pos: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        b, h, w, c = x.shape
        # qkv layout: [Q | K | V], each split into heads.
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, HW, d)
        mask = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(
                q.reshape(b * self.num_heads, h * w, self.head_dim),
                self.rel_pos_h,
                self.rel_pos_w,
                (h, w),
                (h, w),
            )
            mask = bias.view(b, self.num_heads, h * w, h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, HW, d)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> windows (B*nW, ws, ws, C), zero-padding bottom/right; also returns padded (Hp, Wp)."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window_size, (-w) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B*nW, ws, ws, C) -> (B, H, W, C), padding removed."""
    hp, wp = padded_hw
    h, w = hw
    nh, nw = hp // window_size, wp // window_size
    b = windows.shape[0] // (nh * nw)
    x = windows.view(b, nh, nw, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w].contiguous()
    return x


class ViTBlock(nn.Module):
    """Pre-norm transformer block; ``window_size`` 0 means global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        grid_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = (window_size, window_size) if window_size > 0 else grid_size
        self.attn = ViTAttention(dim, num_heads, attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1:3]
            windows, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(windows), self.window_size, padded, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ViTPatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/p, W/p, D) by a strided convolution (``proj``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM ViT encoder: (B, 3, img_size, img_size) -> (B, out_chans, img_size/16, img_size/16)."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = ViTPatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        global_set = set(global_attn_indexes)
        self.blocks = nn.ModuleList(
            ViTBlock(
                embed_dim,
                num_heads,
                mlp_ratio,
                window_size=0 if i in global_set else window_size,
                grid_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) float, already normalised -> (B, 256, S/16, S/16)."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"the SAM ViT encoder expects a {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}"
            )
        x = self.patch_embed(x) + self.pos_embed  # (B, 64, 64, D)
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


def build_vit_encoder(variant: str, img_size: int = 1024) -> ImageEncoderViT:
    """ViT encoder for ``variant`` in {"vit_b", "vit_l", "vit_h"}."""
    try:
        cfg = VIT_CONFIGS[variant]
    except KeyError:
        raise ValueError(f"unknown SAM ViT variant {variant!r}; choose one of {sorted(VIT_CONFIGS)}") from None
    return ImageEncoderViT(
        img_size=img_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        global_attn_indexes=cfg.global_attn_indexes,
    )
