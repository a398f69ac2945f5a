"""Fine-tuned checkpoints: save (atomic) and read, plus the safe file loader used by the registry.

File format (a ``torch.save`` of plain containers and tensors, readable with
``torch.load(..., weights_only=True)``)::

    {"format": "medsam_plugin.checkpoint/1",
     "base": "<registry name of the model it was fine-tuned from>",
     "state_dict": {<key>: tensor, ...},   # often only prompt_encoder.* / mask_decoder.*
     "meta": {...}}                          # plain JSON-like values: str, int, float, bool, None, list, dict
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError

CHECKPOINT_FORMAT = "medsam_plugin.checkpoint/1"
DEFAULT_TRAINABLE_PREFIXES = ("prompt_encoder.", "mask_decoder.")


def _plain(value: Any, where: str = "meta") -> Any:
    """Convert ``value`` to plain containers that ``weights_only`` loading accepts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", None) == 0:
        return item()
    raise TypeError(
        f"{where} holds a {type(value).__name__}; checkpoint metadata must be plain values "
        "(str, int, float, bool, None, lists and dicts of them)"
    )


def save_checkpoint(
    path: str | os.PathLike,
    sam: nn.Module,
    base: str,
    meta: Mapping[str, Any] | None = None,
    trainable_prefixes: Iterable[str] | None = DEFAULT_TRAINABLE_PREFIXES,
) -> Path:
    """Save the weights of ``sam`` under ``trainable_prefixes`` as a fine-tuned checkpoint.

    Args:
        path: destination file (``.pth``); parent folders are created.
        sam: the model (a ``SamModel``).
        base: registry name of the model it was fine-tuned from (e.g. "lite_medsam"); loading
            builds that model and applies these weights on top of it.
        meta: plain metadata (training settings, data, metrics...).
        trainable_prefixes: state_dict key prefixes to store; None stores the whole model.

    The write is atomic (``io.atomic.atomic_torch_save``: a temporary file in the same folder,
    fsynced, then renamed). Returns the path written.
    """
    if not isinstance(base, str) or not base:
        raise ValueError("base must be the registry name of the model that was fine-tuned, e.g. 'lite_medsam'")
    prefixes = None if trainable_prefixes is None else tuple(trainable_prefixes)
    state = {
        key: tensor.detach().to("cpu").clone()
        for key, tensor in sam.state_dict().items()
        if prefixes is None or key.startswith(prefixes)
    }
    if not state:
        raise ValueError(f"no weights of the model start with {prefixes}; nothing to save")
    payload = {"format": CHECKPOINT_FORMAT, "base": base, "state_dict": state, "meta": _plain(dict(meta or {}))}

    from ..io.atomic import atomic_torch_save

    return atomic_torch_save(Path(path), payload)


def load_file(path: str | os.PathLike, what: str = "model weights file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with user-facing errors.

    Raises :class:`ModelLoadError` for a missing file, a folder, an unreadable or damaged file,
    and a file that holds arbitrary Python objects (refused for safety).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"The {what} '{path}' does not exist. Check the path, or download the file and point to it."
        )
    if path.is_dir():
        raise ModelLoadError(f"The {what} '{path}' is a folder, not a file. Point to the .pth file inside it.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Random bytes and damaged files fail in the same unpickler as files with code in them:
        # only a named GLOBAL means "Python objects"; a file that is no zip/pickle at all is damaged.
        text = str(exc)
        if "GLOBAL" not in text and "Unsupported global" not in text:
            raise _corrupt(path, what, exc) from exc
        if "weights only" in text.lower() or "weights_only" in text.lower():
            raise ModelLoadError(
                f"The {what} '{path}' contains Python objects other than tensors and plain containers, "
                "so it was not loaded (loading it could run arbitrary code). Re-save it as a plain "
                "state_dict (torch.save(model.state_dict(), path)) from a trusted source."
            ) from exc
        raise _corrupt(path, what, exc) from exc
    except PermissionError as exc:
        raise ModelLoadError(
            f"The {what} '{path}' cannot be read: permission denied. Fix the file permissions or copy it elsewhere."
        ) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError... for damaged files
        raise _corrupt(path, what, exc) from exc
    _check_finite_weights(obj, path, what)
    return obj


def _check_finite_weights(obj: Any, path: Path, what: str, _depth: int = 0) -> None:
    """NaN or infinite weights give empty or random masks without any error: refuse them here."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            raise ModelLoadError(
                f"The {what} '{path}' holds weights that are NaN or infinite (e.g. from a training run that "
                "diverged), so it would give meaningless masks. Use an earlier checkpoint or train again."
            )
    elif isinstance(obj, Mapping) and _depth < 8:
        for value in obj.values():
            _check_finite_weights(value, path, what, _depth + 1)
    elif isinstance(obj, (list, tuple)) and _depth < 8:
        for value in obj:
            _check_finite_weights(value, path, what, _depth + 1)


def _corrupt(path: Path, what: str, exc: BaseException) -> ModelLoadError:
    size = path.stat().st_size if path.exists() else 0
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip() and "Weights only load failed" not in ln), "")
    if isinstance(exc, pickle.UnpicklingError):
        first = ""  # torch's advice (to load with weights_only=False) is the wrong one here
    return ModelLoadError(
        f"The {what} '{path}' ({size:,} bytes) could not be read as a PyTorch file: it is damaged, "
        f"truncated or not a checkpoint{' (' + type(exc).__name__ + ': ' + first[:160] + ')' if first else ''}. "
        "Download or copy it again."
    )


def is_finetuned_checkpoint(obj: Any) -> bool:
    """True if ``obj`` (a loaded file) is in the ``medsam_plugin.checkpoint/*`` format."""
    return isinstance(obj, Mapping) and str(obj.get("format", "")).startswith("medsam_plugin.checkpoint/")


def validate_checkpoint(obj: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Check a loaded fine-tuned checkpoint; return it as a dict or raise :class:`ModelLoadError`."""
    if not is_finetuned_checkpoint(obj):
        raise ModelLoadError(
            f"The file '{path}' is not a medsam_plugin fine-tuned checkpoint (no "
            f"'format': '{CHECKPOINT_FORMAT}' entry). Load plain SAM/MedSAM weights by path with load_model instead."
        )
    if obj["format"] != CHECKPOINT_FORMAT:
        raise ModelLoadError(
            f"The checkpoint '{path}' has format '{obj['format']}', which this version of medsam_plugin "
            f"cannot read (it reads '{CHECKPOINT_FORMAT}'). Update medsam_plugin."
        )
    base = obj.get("base")
    state = obj.get("state_dict")
    if not isinstance(base, str) or not base:
        raise ModelLoadError(f"The checkpoint '{path}' does not say which model it was fine-tuned from ('base' is missing). Re-save it with save_checkpoint.")
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelLoadError(f"The checkpoint '{path}' has no usable 'state_dict' (a mapping of names to tensors). Re-save it with save_checkpoint.")
    meta = obj.get("meta") or {}
    return {"format": obj["format"], "base": base, "state_dict": dict(state), "meta": dict(meta)}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a fine-tuned checkpoint -> {"format", "base", "state_dict", "meta"} (tensors on CPU).

    Raises :class:`ModelLoadError` with a sentence for the user when the file is missing,
    damaged or not in this format.
    """
    return validate_checkpoint(load_file(path, "checkpoint"), path)
