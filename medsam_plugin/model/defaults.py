"""The default model's name, in a module that imports nothing heavy (the widget and the CLI's
argument parser read it before torch is imported).

`medsam_interactive` (LiteMedSAM fine-tuned here for clicks, corrections and dense prompts) is the
default: on the shared scans it never trained on it answers one click (seed Dice 0.473 against
0.041), keeps the box answer (0.618 against 0.617) and propagates 0.058 better on average
(benchmarks/interactive.py; docs/TRAINING.md). `lite_medsam` stays one flag away.
"""

DEFAULT_MODEL = "medsam_interactive"
