"""Where a predicted object starts and ends along z, against the truth.

Dice hides where a walk went wrong: a walk that runs three slices past the spleen into the lung
and one that stops three slices short can score alike. The span report says which end is off,
in which direction and by how many slices.
"""

from __future__ import annotations

import numpy as np


def slice_range(mask_zyx: np.ndarray) -> tuple[int, int] | None:
    """(first, last) slice index holding any voxel of a (Z, H, W) mask, or None when it is empty."""
    present = np.flatnonzero(np.asarray(mask_zyx, dtype=bool).reshape(mask_zyx.shape[0], -1).any(axis=1))
    return None if present.size == 0 else (int(present[0]), int(present[-1]))


def span_report(pred_zyx: np.ndarray, truth_zyx: np.ndarray) -> dict:
    """Compare the slice ranges of a prediction and its truth.

    Args:
        pred_zyx: (Z, H, W) bool, the predicted object in the view frame.
        truth_zyx: (Z, H, W) bool, the ground truth in the same frame.
    Returns:
        pred_range / truth_range: [first, last] slice with any voxel, or None when empty;
        overshoot_low: truth_first - pred_first (slices predicted below the truth's first slice;
            negative = the prediction starts above it, i.e. stops short at the low end);
        overshoot_high: pred_last - truth_last (positive = beyond the truth's last slice);
        ends_within_1: both ends within one slice of the truth's.
        An empty prediction (or truth) has None overshoots and ends_within_1 False.
    """
    if pred_zyx.shape != truth_zyx.shape:
        raise ValueError(f"Prediction {pred_zyx.shape} and truth {truth_zyx.shape} must have the same (Z, H, W) shape.")
    pred, truth = slice_range(pred_zyx), slice_range(truth_zyx)
    report = {"pred_range": None if pred is None else list(pred),
              "truth_range": None if truth is None else list(truth),
              "overshoot_low": None, "overshoot_high": None, "ends_within_1": False}
    if pred is not None and truth is not None:
        low, high = truth[0] - pred[0], pred[1] - truth[1]
        report.update(overshoot_low=int(low), overshoot_high=int(high),
                      ends_within_1=bool(abs(low) <= 1 and abs(high) <= 1))
    return report


def format_span(report: dict) -> str:
    """One line for a table: 'pred 3-25 truth 3-22 ends +0/+3'."""
    def rng(r):
        return "empty" if r is None else f"{r[0]}-{r[1]}"

    if report["overshoot_low"] is None:
        ends = "n/a"
    else:
        ends = f"{report['overshoot_low']:+d}/{report['overshoot_high']:+d}"
    return f"pred {rng(report['pred_range'])} truth {rng(report['truth_range'])} ends {ends}"
