"""TinyViT image encoder as used by LiteMedSAM (a MobileSAM-style distilled SAM encoder).

Layout of the LiteMedSAM variant (input 256x256, output a 256x64x64 embedding):

- patch embedding: two 1x1 conv+BN layers with a GELU in between; no downsampling, so the
  first (convolutional) stage runs at the full input resolution;
- stage 0: MBConv blocks (1x1 expand, 3x3 depthwise, 1x1 project, residual), then a patch
  merging with stride 2 (256 -> 128);
- stages 1-3: windowed self-attention blocks with a learned bias per (|dy|, |dx|) offset inside
  the window, a 3x3 depthwise conv+BN after the attention and a pre-norm MLP; patch merging
  strides 2 then 1 (128 -> 64 -> 64);
- neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d to 256 channels, as in SAM.

Parameter and buffer names follow the published state_dict (``patch_embed.seq.0.c.weight``,
``layers.1.blocks.0.attn.attention_biases``, ``neck.2.weight``...), so the real weights load
with ``strict=True``. Training-only machinery (stochastic depth, activation checkpointing) is
left out: this module is for inference and light fine-tuning.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d


class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d; children are named ``c`` and ``bn``."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.add_module(
            "c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False)
        )
        self.add_module("bn", nn.BatchNorm2d(out_chans))


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, D, H, W): two pointwise conv+BN layers, resolution unchanged."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        hidden = embed_dim // 2
        self.seq = nn.Sequential(ConvBN(in_chans, hidden), nn.GELU(), ConvBN(hidden, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block on (B, C, H, W): expand 1x1, depthwise 3x3, project 1x1, add, GELU."""

    def __init__(self, chans: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(chans * expand_ratio)
        self.conv1 = ConvBN(chans, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.conv3 = ConvBN(hidden, chans)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        y = self.conv3(y)
        return self.act(x + y)


class PatchMerging(nn.Module):
    """Change width (and optionally halve resolution) between stages.

    Input: (B, C, H, W), or tokens (B, H*W, C) at ``in_resolution``. Output: tokens
    (B, H'*W', C_out) with H' = ceil(H / stride).
    """

    def __init__(self, in_resolution: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.in_resolution = in_resolution
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, kernel_size=3, stride=stride, padding=1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # tokens (B, L, C) -> (B, C, H, W)
            h, w = self.in_resolution
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)  # (B, H'*W', C_out)


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks on (B, C, H, W), then an optional patch merging to tokens."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


@functools.lru_cache(maxsize=8)
def _offset_index_cpu(window_size: int) -> torch.Tensor:
    with torch.device("cpu"):
        return _window_offset_index(window_size)


def _window_offset_index(window_size: int) -> torch.Tensor:
    """(N, N) long index into the per-offset bias table, N = window_size**2.

    Positions are enumerated row-major inside the window; the offset between positions p and q
    is (|dy|, |dx|) and its table column is ``|dy| * window_size + |dx|`` (the order in which the
    offsets first appear when scanning pairs row-major, which is the published layout).
    """
    coords = torch.arange(window_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()  # (N,)
    dy = (yy[:, None] - yy[None, :]).abs()
    dx = (xx[:, None] - xx[None, :]).abs()
    return dy * window_size + dx  # (N, N)


class WindowAttention(nn.Module):
    """Pre-norm multi-head self-attention inside one window, with a learned offset bias.

    Input/output: (B_windows, N, C) with N = window_size**2.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.window_size = window_size
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer("attention_bias_idxs", _window_offset_index(window_size), persistent=False)

    def reset_nonpersistent_buffers(self) -> None:
        """Recompute buffers that are not in the state_dict (after building on the meta device)."""
        device = self.attention_biases.device
        self.attention_bias_idxs = _offset_index_cpu(self.window_size).to(device, copy=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        x = self.norm(x)
        # The published qkv weight is laid out per head as [q | k | v] (head-major), not [Q | K | V].
        qkv = self.qkv(x).view(b, n, self.num_heads, 3 * self.head_dim).permute(0, 2, 1, 3)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each (B, heads, N, d)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm, fc1, GELU, fc2 on (..., C)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention + residual, depthwise local conv, MLP + residual, on tokens (B, H*W, C)."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        local_conv_size: int = 3,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(
            dim, dim, kernel_size=local_conv_size, padding=local_conv_size // 2, groups=dim
        )

    def _windowed_attention(self, x: torch.Tensor, attention=None) -> torch.Tensor:
        """Window partition, `attention` on (B*nW, ws*ws, C) windows (default: self.attn), merge back."""
        attention = self.attn if attention is None else attention
        h, w = self.resolution
        b, _, c = x.shape
        ws = self.window_size
        if h == ws and w == ws:
            return attention(x)
        # Zero-pad bottom/right to whole windows. The padding goes in *before* the attention's
        # layer norm, so padded tokens take part as keys exactly as in the published model.
        x = x.view(b, h, w, c)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        windows = (
            x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        )  # (B*nW, ws*ws, C)
        windows = attention(windows)
        x = windows.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            x = x[:, :h, :w]
        return x.reshape(b, h * w, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H*W, C)
        h, w = self.resolution
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"expected {h}x{w}={h * w} tokens, got {n}")
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w))
        x = x.reshape(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class AttentionStage(nn.Module):
    """Stages 1-3: TinyViT blocks on tokens, then an optional patch merging."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, resolution, num_heads, window_size, mlp_ratio, local_conv_size)
            for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class TinyViT(nn.Module):
    """TinyViT encoder: (B, 3, S, S) float -> (B, out_chans, S/4, S/4) with the default strides.

    Args:
        img_size: input side S (256 for LiteMedSAM).
        embed_dims, depths, num_heads, window_sizes: per-stage settings (stage 0 is convolutional;
            its ``num_heads``/``window_sizes`` entries are ignored).
        merge_strides: stride of the patch merging after stages 0, 1, 2.
    """

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        merge_strides: Sequence[int] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        n_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(window_sizes) == n_stages):
            raise ValueError("embed_dims, depths, num_heads and window_sizes need one entry per stage")
        if len(merge_strides) != n_stages - 1:
            raise ValueError("merge_strides needs one entry per stage transition")
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])

        resolutions = [(img_size, img_size)]
        for stride in merge_strides:
            h, w = resolutions[-1]
            resolutions.append((-(-h // stride), -(-w // stride)))  # 3x3 conv, pad 1: ceil(h / s)
        self.out_resolution = resolutions[-1]

        self.layers = nn.ModuleList()
        for i in range(n_stages):
            downsample = None
            if i < n_stages - 1:
                downsample = PatchMerging(resolutions[i], embed_dims[i], embed_dims[i + 1], merge_strides[i])
            if i == 0:
                stage: nn.Module = ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, downsample)
            else:
                stage = AttentionStage(
                    embed_dims[i],
                    resolutions[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    local_conv_size,
                    downsample,
                )
            self.layers.append(stage)

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) float, already normalised -> (B, out_chans, H', W') image embedding."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"TinyViT expects a {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}"
            )
        x = self.patch_embed(x)  # (B, D0, S, S)
        for stage in self.layers:
            x = stage(x)  # tokens (B, L, D) after the first merging
        h, w = self.out_resolution
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, D_last, h, w)
        return self.neck(x)
