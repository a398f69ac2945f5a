"""Choice of the torch device: ``auto`` picks CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

import torch

from .errors import DeviceNotAvailableError


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn "auto" | "cpu" | "cuda" | "cuda:N" | "mps" (or a torch.device) into a torch.device.

    "auto" (or None) picks the first of CUDA, MPS and CPU that is available. An explicit device
    that this machine does not have raises :class:`DeviceNotAvailableError` with what to use instead.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceNotAvailableError(
            f"Unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceNotAvailableError(
                f"Device {device!r} was requested, but this PyTorch build sees no CUDA GPU "
                f"(torch {torch.__version__}). Use device 'cpu' or 'auto', or install a CUDA build of PyTorch."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceNotAvailableError(
                f"Device {device!r} was requested, but only {count} CUDA GPU(s) are visible "
                f"(cuda:0..cuda:{count - 1}). Pick one of those or use 'auto'."
            )
    elif dev.type == "mps":
        if not _mps_available():
            raise DeviceNotAvailableError(
                f"Device {device!r} (Apple Metal) was requested, but it is not available here. "
                "Use device 'cpu' or 'auto'."
            )
    elif dev.type != "cpu":
        raise DeviceNotAvailableError(
            f"Device {device!r} is not supported: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
        )
    return dev
