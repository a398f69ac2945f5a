"""What the front ends say about an answer the model is unsure of (the rule, without Qt).

An answer to clicks alone (no box) whose predicted IoU (the model's own estimate of its overlap
with the truth) is under `WEAK_ANSWER_IOU` is flagged: the widget's status line says the model is
unsure and what to give it instead.

Chosen by measurement (benchmarks/weak_answer.py, the default model medsam_interactive, seed slices
of the shared cases and the first sarcoma patients; a "weak" answer has true Dice under 0.7):
on one-click answers (48 answers, 10 patients) the threshold that maximises Youden's J is 0.77;
leave-one-patient-out the thresholds ranged 0.75-0.79 and flagged 78 % of the weak answers with
62 % specificity (mean Dice of the flagged answers 0.59, of the others 0.80). For box answers
the predicted IoU does not separate weak from good (held out: 43 % sensitivity, 54 % specificity),
so they are not flagged.
"""

from __future__ import annotations

WEAK_ANSWER_IOU = 0.77


def is_weak(predicted_iou: float, had_box: bool = False) -> bool:
    """Whether to flag an answer: clicks alone (`had_box` False) with predicted IoU under the threshold."""
    return not had_box and float(predicted_iou) < WEAK_ANSWER_IOU


def weak_answer_note(predicted_iou: float, had_box: bool) -> str:
    """A sentence for an unsure answer ("" for a sure one, or a box answer): what the user should do next."""
    if not is_weak(predicted_iou, had_box):
        return ""
    return (f"The model is unsure of this answer (predicted IoU {float(predicted_iou):.2f}, under "
            f"{WEAK_ANSWER_IOU:.2f}): check it, and draw a box around the structure or add a click, "
            "then press S again.")
