"""What the front ends say about an answer the model is unsure of (the rule, without Qt).

A slice answer whose predicted IoU (the model's own estimate of its overlap with the truth) is
under `WEAK_ANSWER_IOU` is flagged: the widget's status line and the CLI say the model is unsure
and what to give it instead. The threshold was chosen by measurement, leave-one-patient-out
(benchmarks/weak_answer.py; the numbers are in docs/NAPARI.md).
"""

from __future__ import annotations

WEAK_ANSWER_IOU = 0.75


def is_weak(predicted_iou: float) -> bool:
    return float(predicted_iou) < WEAK_ANSWER_IOU


def weak_answer_note(predicted_iou: float, had_box: bool) -> str:
    """A sentence for an unsure answer ("" for a sure one): what the user should do next."""
    if not is_weak(predicted_iou):
        return ""
    what = ("add a + click inside the structure (or a - click on what it wrongly took) and press S again"
            if had_box else
            "draw a box around the structure, or add another click, and press S again")
    return (f"The model is unsure of this answer (predicted IoU {float(predicted_iou):.2f}, under "
            f"{WEAK_ANSWER_IOU:.2f}): check it, and {what}.")
