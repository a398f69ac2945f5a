"""``SamModel``: image encoder + prompt encoder + mask decoder, and the builders per family.

The model does no preprocessing: the engine normalises and pads the slice (see
``ModelSpec.normalization``) and converts prompts to model-input pixels before calling it.
"""

from __future__ import annotations

import torch
from torch import nn

from .mask_decoder import MaskDecoder, TwoWayTransformer
from .prompt_encoder import PromptEncoder
from .sam_vit import VIT_CONFIGS, build_vit_encoder
from .tiny_vit import TinyViT

EMBED_DIM = 256
EMBED_GRID = 64  # the image embedding is EMBED_DIM x 64 x 64 for every family here


class SamModel(nn.Module):
    """Segment-Anything model with Meta's module names (``image_encoder``, ``prompt_encoder``,
    ``mask_decoder``), so SAM, MedSAM and LiteMedSAM state_dicts load as they are.

    Attributes:
        family: "tiny_vit" | "vit_b" | "vit_l" | "vit_h".
        image_size: side S of the square encoder input (256 or 1024).
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        family: str,
        image_size: int,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.family = family
        self.image_size = image_size

    @staticmethod
    def pad_points(coords: torch.Tensor, labels: torch.Tensor, has_box: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's rule for point prompts: without a box, a "not a point" token (label -1) is appended.

        coords (B, N, 2) model-input xy, labels (B, N) int -> the tensors the prompt encoder takes.
        The engine and the trainers both call this, so training sees exactly what inference gives.
        """
        if has_box:
            return coords, labels
        return (torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1),
                torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1))

    def decode(
        self,
        image_embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder on precomputed embeddings: the one decode path (the
        engine's reference decoder, ``forward`` and both trainers call it; the engine's fast decoder,
        ``model/fast_decoder.py``, is the same fp32 maths with per-slice work kept).

        image_embeddings (B or 1, 256, 64, 64); prompts as in ``PromptEncoder.forward``
        (model-input pixels, xy) -> (low_res_logits (B, M, 256, 256), iou_pred (B, M)).
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def forward(
        self,
        images: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) -> (low_res_logits (B, M, 256, 256), iou_pred (B, M)); differentiable."""
        return self.decode(self.image_encoder(images), points, boxes, masks, multimask_output)


def _prompt_encoder(image_size: int) -> PromptEncoder:
    return PromptEncoder(
        embed_dim=EMBED_DIM,
        image_embedding_size=(EMBED_GRID, EMBED_GRID),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )


def _mask_decoder() -> MaskDecoder:
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


def build_lite_medsam() -> SamModel:
    """LiteMedSAM: TinyViT (64/128/160/320, depths 2/2/6/2) on 256x256 inputs; random weights."""
    encoder = TinyViT(
        img_size=256,
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        merge_strides=(2, 2, 1),
    )
    return SamModel(encoder, _prompt_encoder(256), _mask_decoder(), family="tiny_vit", image_size=256)


def build_sam_vit(variant: str = "vit_b") -> SamModel:
    """SAM / MedSAM with a ViT-B, ViT-L or ViT-H encoder on 1024x1024 inputs; random weights.

    Build under ``with torch.device("meta"):`` to get the structure without allocating memory.
    """
    if variant not in VIT_CONFIGS:
        raise ValueError(f"unknown SAM ViT variant {variant!r}; choose one of {sorted(VIT_CONFIGS)}")
    return SamModel(
        build_vit_encoder(variant, img_size=1024),
        _prompt_encoder(1024),
        _mask_decoder(),
        family=variant,
        image_size=1024,
    )


def build_model(family: str) -> SamModel:
    """Builder by family name: "tiny_vit" | "vit_b" | "vit_l" | "vit_h"."""
    if family == "tiny_vit":
        return build_lite_medsam()
    return build_sam_vit(family)
