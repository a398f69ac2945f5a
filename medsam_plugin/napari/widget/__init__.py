"""The MedSAM dock widget, split by what each part does.

- `controller.py`: `MedSAMWidget`, the dock widget napari makes (napari.yaml): glue between the
  panel, the viewer's layers and `engine.session.SegmentationSession`, background work and autosave.
- `panel.py`: the Qt widgets and layout of the dock panel, and how they show state.
- `strip.py`: the review strip (per-slice confidence along z), a section of the panel.
- `label_layers.py`: the layers that show the session's result (labels, pending, one per
  overlapping object, orientation markers), and the brush strokes read back from them.
- `prompt_layers.py`: napari Points/Shapes layers <-> the engine's prompts on a slice.
- `keys.py`: the keyboard shortcuts, bound on the viewer and the plugin's layers.

The workflow's rules are the session's; long work runs through `.._tasks`, autosaves through
`.._autosave`.
"""

from .controller import MedSAMWidget

__all__ = ["MedSAMWidget"]
