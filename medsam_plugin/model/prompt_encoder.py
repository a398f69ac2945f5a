"""SAM prompt encoder: points, boxes and low-res masks -> sparse and dense prompt embeddings.

Frames: point and box coordinates are (x, y) pixels in the *model input* frame (0..S for an
S x S encoder input: 256 for LiteMedSAM, 1024 for the ViT models). Masks are (B, 1, 256, 256)
logits, i.e. 4x the 64x64 embedding grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) positions: (..., 2) in [0, 1] -> (..., 2F)."""

    def __init__(self, num_pos_feats: int = 128, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _encode(self, coords01: torch.Tensor) -> torch.Tensor:
        gauss = self.positional_encoding_gaussian_matrix
        proj = (2.0 * coords01.to(gauss.dtype) - 1.0) @ gauss  # (..., F)
        proj = 2.0 * math.pi * proj
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)  # (..., 2F)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the pixel centres of an (h, w) grid -> (2F, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(
            [xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1
        )  # (h, w, 2) as (x, y)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords_xy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """coords_xy: (B, N, 2) pixels (x, y) in an image of size (h, w) -> (B, N, 2F)."""
        h, w = image_size
        size_xy = torch.tensor([float(w), float(h)], dtype=coords_xy.dtype, device=coords_xy.device)
        return self._encode(coords_xy / size_xy)


class PromptEncoder(nn.Module):
    """Encode SAM prompts.

    Args:
        embed_dim: prompt embedding width (256).
        image_embedding_size: (h, w) of the image embedding (64, 64).
        input_image_size: (H, W) of the padded encoder input (256 or 1024).
        mask_in_chans: hidden channels of the mask downscaler (16).
    """

    num_point_embeddings = 4  # background point, foreground point, box top-left, box bottom-right

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid -> (1, embed_dim, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, coords_xy: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """coords_xy (B, N, 2) pixels, labels (B, N) 1/0/-1 -> (B, N[+1], embed_dim)."""
        coords_xy = coords_xy + 0.5  # pixel index -> pixel centre
        if pad:
            # Without a box, SAM appends one "not a point" token.
            b = coords_xy.shape[0]
            coords_xy = torch.cat([coords_xy, coords_xy.new_zeros(b, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((b, 1), -1)], dim=1)
        emb = self.pe_layer.forward_with_coords(coords_xy, self.input_image_size)  # (B, N, D)
        is_pad = (labels == -1).unsqueeze(-1)
        is_bg = (labels == 0).unsqueeze(-1)
        is_fg = (labels == 1).unsqueeze(-1)
        emb = torch.where(is_pad, self.not_a_point_embed.weight.to(emb.dtype), emb)
        emb = torch.where(is_bg, emb + self.point_embeddings[0].weight, emb)
        emb = torch.where(is_fg, emb + self.point_embeddings[1].weight, emb)
        return emb

    def _embed_boxes(self, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """boxes_xyxy (B, 4) or (B, 1, 4) pixels -> (B, 2, embed_dim) corner embeddings."""
        corners = (boxes_xyxy + 0.5).reshape(-1, 2, 2)  # (B, 2 corners, xy)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_ids = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return emb + corner_ids  # (B, 2, D)

    @staticmethod
    def _batch_size(points, boxes, masks) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
            points: (coords (B, N, 2) float xy model-input pixels, labels (B, N) int 1 fg / 0 bg /
                -1 padding), or None.
            boxes: (B, 4) xyxy model-input pixels, or None.
            masks: (B, 1, 256, 256) low-res logits, or None.

        Returns:
            sparse (B, K, embed_dim), K = N (+1 padding token when there is no box) + 2 per box;
            dense (B, embed_dim, 64, 64).
        """
        bs = self._batch_size(points, boxes, masks)
        weight = self.no_mask_embed.weight
        parts = []
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if parts:
            sparse = torch.cat(parts, dim=1)
        else:
            sparse = weight.new_empty(bs, 0, self.embed_dim)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense
