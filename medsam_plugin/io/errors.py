"""The io package's exceptions, in a module of their own so that readers, writers and DICOM SEG
share them without importing each other."""

from __future__ import annotations


class ImageReadError(Exception):
    """A volume or label map could not be read; the message says which file, why, and what to do."""


class LabelMismatchError(ImageReadError):
    """A label map does not fit its reference image (shape or voxel-to-world geometry differ)."""


class LabelWriteError(Exception):
    """A label map (or a sidecar) could not be written; nothing partial was left behind."""
