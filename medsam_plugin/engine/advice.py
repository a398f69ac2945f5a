"""What the front ends say about an answer the model is unsure of (the rule, without Qt).

An answer to clicks alone (no box) whose predicted IoU (the model's own estimate of its overlap
with the truth) is under `WEAK_ANSWER_IOU` is flagged: the widget's status line says the model is
unsure and what to give it instead.

Chosen by measurement for the shipped model (medsam_interactive v2, lesion-trained):
`python benchmarks/weak_answer.py --held-out recipes/lesion_datalist.json`, seed slices (largest,
quarter, three quarters) of the objects it never trained on: the 10 validation sarcoma patients
(CT and MR), the stroke case, spinal cord and BraTS; a "weak" answer has true Dice under 0.7.
On one-click answers (85 answers, 15 patients, 29 weak) Youden's J is largest at 0.84;
leave-one-patient-out the thresholds ranged 0.82-0.84 and flagged 83 % of the weak answers with
62 % specificity (mean Dice of the flagged answers 0.62, of the others 0.84). The earlier 0.77,
chosen for the organ-trained v1, caught only 31 % of v2's weak click answers. Box answers are not
flagged: held out, predicted IoU 0.78 would catch 79 % of the weak ones, but two thirds of the
flags would fall on good answers (precision 0.33).
"""

from __future__ import annotations

WEAK_ANSWER_IOU = 0.84


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
