"""`ModelChoice`: which model runs, on which device, on which view of a scan, with which cache.

One frozen value for what the command line's model flags (`--model --device --window --axis
--cache-dir`), the dataset evaluation and training's model comparison all choose, instead of the
same five arguments handed down through each of them. Importing this module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

from ..model.defaults import DEFAULT_MODEL

__all__ = ["ModelChoice"]

WindowChoice = Union[None, str, Sequence[float]]


@dataclass(frozen=True)
class ModelChoice:
    """The model choice of a run.

    Attributes:
        model: a registered model name or a checkpoint path (`model.registry.load_model`).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        window: the intensity window (`engine.preprocessing.parse_window`); None picks by modality.
        axis: the slicing axis, "axial", "coronal" or "sagittal".
        cache_dir: a folder for slice embeddings on disk, or None for memory only.

    The image-encoder path is not part of the choice: the session picks the fastest one with fp32
    numerics (`model.fast.make_encoder`; the MEDSAM_ENCODER variable forces one).
    """

    model: str = DEFAULT_MODEL
    device: str = "auto"
    window: WindowChoice = None
    axis: str = "axial"
    cache_dir: str | None = None

    @classmethod
    def from_args(cls, args) -> "ModelChoice":
        """The choice the command line's `--model --device --window --axis [--cache-dir]` flags make."""
        return cls(model=args.model, device=args.device, window=args.window, axis=args.axis,
                   cache_dir=getattr(args, "cache_dir", None))

    def load(self):
        """The chosen model, loaded on the chosen device (`model.registry.load_model`)."""
        from ..model.registry import load_model

        return load_model(self.model, device=self.device)

    def session(self, volume, loaded_model=None):
        """A `SegmentationSession` on `volume` with this choice (`loaded_model`: one already loaded, shared)."""
        from .session import SegmentationSession

        return SegmentationSession(volume, model=self.model, device=self.device, axis=self.axis, window=self.window,
                                   loaded_model=loaded_model, cache_dir=self.cache_dir)
