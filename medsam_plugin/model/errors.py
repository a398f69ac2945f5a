"""Exceptions of the model package (import-light: no torch)."""

from __future__ import annotations


class ModelLoadError(Exception):
    """A model or checkpoint could not be loaded.

    The message is a full sentence for the user: which file, what is wrong, what to do.
    """


class DeviceNotAvailableError(RuntimeError):
    """The requested compute device does not exist on this machine."""
