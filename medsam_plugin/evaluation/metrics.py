"""Overlap and surface metrics on 3D binary masks, computed with MONAI."""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean volumes; 1.0 when both are empty."""
    import torch
    from monai.metrics import compute_dice

    p = torch.as_tensor(np.asarray(pred, dtype=bool))[None, None].float()
    t = torch.as_tensor(np.asarray(truth, dtype=bool))[None, None].float()
    value = compute_dice(p, t, include_background=True, ignore_empty=False)
    return float(value.item())


def normalized_surface_dice(pred: np.ndarray, truth: np.ndarray, spacing_mm, tolerance_mm: float = 2.0) -> float:
    """NSD at `tolerance_mm` (the MedSAM papers' surface metric); spacing in the arrays' axis order."""
    import torch
    from monai.metrics import compute_surface_dice

    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if not pred.any() and not truth.any():
        return 1.0
    if not pred.any() or not truth.any():
        return 0.0
    p = torch.as_tensor(np.stack([~pred, pred]))[None].float()
    t = torch.as_tensor(np.stack([~truth, truth]))[None].float()
    value = compute_surface_dice(p, t, class_thresholds=[tolerance_mm], include_background=False,
                                 spacing=[float(s) for s in spacing_mm])
    return float(value.item())
