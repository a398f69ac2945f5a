"""Model package: pure nn.Modules (TinyViT, SAM ViT, prompt encoder, mask decoder), the model
registry with checksum-verified loading, fine-tuned checkpoints and device choice.

Importing this package does not import torch; the public names below load their module on
first access::

    from medsam_plugin.model import load_model
    loaded = load_model("lite_medsam", device="auto")
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_model": "registry",
    "LoadedModel": "registry",
    "ModelSpec": "registry",
    "REGISTRY": "registry",
    "DEFAULT_MODEL": "registry",
    "list_models": "registry",
    "check_available": "registry",
    "infer_family": "registry",
    "file_sha256": "registry",
    "SAM_PIXEL_MEAN": "registry",
    "SAM_PIXEL_STD": "registry",
    "ModelLoadError": "errors",
    "DeviceNotAvailableError": "errors",
    "resolve_device": "device",
    "save_checkpoint": "checkpoints",
    "read_checkpoint": "checkpoints",
    "CHECKPOINT_FORMAT": "checkpoints",
    "SamModel": "sam",
    "build_lite_medsam": "sam",
    "build_sam_vit": "sam",
    "build_model": "sam",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
