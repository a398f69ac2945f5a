"""Choices of `medsam-plugin finetune`, in a module that imports nothing heavy: the command line
builds its parser from these without importing torch.distributed or MONAI."""

TRAIN_MODES = ("decoder", "all", "lora")
# recipe -> sampling weight. "pred" = the model's own logits on the neighbour (what the engine
# feeds in mask modes), "mask" = the neighbour's ground truth as +/- logits.
PROMPT_RECIPES: dict[str, float] = {
    "box": 0.15,             # expert box on the target (jittered GT box)
    "mask": 0.10,            # neighbour's GT as dense prompt
    "pred": 0.20,            # neighbour's predicted logits as dense prompt (mask mode)
    "box+mask": 0.10,        # propagation box (neighbour's box + 3 px) + GT dense prompt
    "box+pred": 0.15,        # propagation box + predicted logits (box+mask mode)
    "points": 0.05,          # neighbour's deepest point (points mode)
    "box+points": 0.05,      # propagation box + that point (box+points mode)
    "box+click": 0.10,       # expert box + a corrective click
    "mask+click": 0.10,      # neighbour's GT dense prompt + a corrective click
}
VALIDATION_RECIPES = ("box", "mask", "box+mask", "pred")
OBJECTIVES = ("propagation", "interactive")
