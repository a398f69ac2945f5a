"""Low-rank adapters (LoRA) on the image encoder's attention ``qkv`` projections.

`apply_lora(encoder, rank)` wraps every ``nn.Linear`` named ``qkv`` in a `LoRALinear` whose base
weight is frozen; only the two small factors train. `merge_lora(model)` folds the adapters back
into plain ``nn.Linear`` layers, so a saved checkpoint has the model's usual keys and loads with
`load_model` without any LoRA code.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """y = base(x) + (x A^T B^T) * alpha / rank, with A (rank, in) and B (out, rank); B starts at 0."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1; got {rank}.")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear equal to this layer."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + (self.lora_b @ self.lora_a) * self.scale)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def apply_lora(module: nn.Module, rank: int = 4, alpha: float | None = None, target: str = "qkv") -> list[str]:
    """Wrap every nn.Linear child named `target` inside `module` in place; returns their names."""
    wrapped = []
    for name, child in list(module.named_modules()):
        for child_name, sub in list(child.named_children()):
            if child_name == target and isinstance(sub, nn.Linear):
                setattr(child, child_name, LoRALinear(sub, rank, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"No nn.Linear layer named '{target}' was found to attach LoRA adapters to.")
    return wrapped


def merge_lora(module: nn.Module) -> int:
    """Replace every LoRALinear inside `module` by its merged nn.Linear, in place; returns how many."""
    count = 0
    for name, child in list(module.named_modules()):
        for child_name, sub in list(child.named_children()):
            if isinstance(sub, LoRALinear):
                setattr(child, child_name, sub.merged())
                count += 1
    return count
