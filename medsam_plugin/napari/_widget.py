"""Where earlier versions kept the whole dock widget; it now lives in the `widget` package.

napari.yaml names `medsam_plugin.napari.widget:MedSAMWidget`; this module keeps the old import path
(`from medsam_plugin.napari._widget import MedSAMWidget`) working for scripts.
"""

from .widget import MedSAMWidget
from .widget.keys import SHORTCUTS
from .widget.label_layers import LAYER_LABELS, LAYER_ORIENTATION, LAYER_OVERLAP_PREFIX, LAYER_PENDING
from .widget.panel import DEVICES, OVERLAP_CHOICES, WINDOW_CHOICES
from .widget.prompt_layers import LAYER_BG, LAYER_BOX, LAYER_FG, prompts_on_slice
from .widget.strip import (STRIP_EMPTY, STRIP_HEIGHT, STRIP_SEED, STRIP_WIDTH, ConfidenceStrip, confidence_color,
                           render_confidence_strip)

__all__ = ["MedSAMWidget", "SHORTCUTS", "LAYER_LABELS", "LAYER_PENDING", "LAYER_OVERLAP_PREFIX", "LAYER_ORIENTATION",
           "LAYER_FG", "LAYER_BG", "LAYER_BOX", "DEVICES", "OVERLAP_CHOICES", "WINDOW_CHOICES", "prompts_on_slice",
           "STRIP_EMPTY", "STRIP_HEIGHT", "STRIP_SEED", "STRIP_WIDTH", "ConfidenceStrip", "confidence_color",
           "render_confidence_strip"]
