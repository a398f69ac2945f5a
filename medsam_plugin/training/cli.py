"""`medsam-plugin finetune` (the training pipeline lands with the fine-tuning work)."""


def add_finetune_parser(sub) -> None:
    return None
