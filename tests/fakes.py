"""Test doubles: a predictor that 'segments' a known synthetic object, so propagation logic is
tested without the model. Real-model tests live in test_engine_real_model.py."""

from __future__ import annotations

import numpy as np

from medsam_plugin.engine.predictor import SlicePrediction


def ellipsoid_zyx(shape=(20, 40, 48), center=(10, 20, 24), radii=(6, 12, 15)) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + ((x - center[2]) / radii[2]) ** 2 <= 1


class FakePredictor:
    """Answers every prompt with the true object's mask on that slice, clipped to the box if any.

    Records each call as (z, prompt kinds) so tests can see which slice prompted which.
    """

    def __init__(self, truth_zyx: np.ndarray):
        self.truth = truth_zyx
        self.volume = np.zeros(truth_zyx.shape, dtype=np.uint8)
        self.calls: list[tuple[int, tuple[str, ...]]] = []
        self.batches: list[int] = []  # prompts per `predict_many` call

    @property
    def n_slices(self) -> int:
        return self.truth.shape[0]

    def has_embedding(self, z):
        return True

    def predict(self, z, points_yx=None, point_labels=None, box_xyxy=None, mask_logits_256=None, multimask=False):
        kinds = tuple(k for k, v in (("points", points_yx), ("box", box_xyxy), ("mask", mask_logits_256)) if v is not None)
        self.calls.append((int(z), kinds))
        mask = self.truth[z].copy()
        if box_xyxy is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in box_xyxy)
            clip = np.zeros_like(mask)
            clip[max(0, y0): y1 + 1, max(0, x0): x1 + 1] = True
            mask &= clip
        logits = np.where(np.resize(mask, (256, 256)), 5.0, -5.0).astype(np.float32)
        return SlicePrediction(z=int(z), mask_yx=mask, logits_256=logits, iou=0.9,
                               prompt={"box_xyxy": box_xyxy, "points_yx": points_yx, "point_labels": point_labels,
                                       "mask": mask_logits_256 is not None})

    def predict_many(self, z, prompts, multimask=False):
        """Several prompts in one call, as `SlicePredictor.predict_many`: each answered by `predict`
        (so subclasses that change `predict` change these too), the call recorded in `batches`."""
        self.batches.append(len(prompts))
        return [self.predict(z, multimask=multimask, **p) for p in prompts]
