"""The default model's name, in a module that imports nothing heavy (the widget and the CLI's
argument parser read it before torch is imported)."""

DEFAULT_MODEL = "lite_medsam"
