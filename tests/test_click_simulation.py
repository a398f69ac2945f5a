"""The simulated expert's corrective clicks follow the CVPR 2025 interactive challenge: the deepest
voxel of the largest 3D error component; its per-round area leaves the first prompt's round out."""

from __future__ import annotations

import numpy as np
import pytest

from medsam_plugin.evaluation.simulate import area_under_rounds, largest_error_click


def test_the_click_goes_to_the_largest_3d_error_not_the_worst_slice():
    truth = np.zeros((12, 30, 30), bool)
    truth[2:10, 5:25, 5:25] = True
    pred = truth.copy()
    pred[2:6] = False  # the walk missed slices 2-5: 4 x 400 wrong voxels in one component
    pred[8, 0:30, 25:30] = True  # one slice with more wrong pixels than any missed slice (150 + ...)
    pred[8, 0:30, 0:5] = True
    pred[8, 0:5, :] = True
    pred[8, 25:30, :] = True
    assert (pred[8] ^ truth[8]).sum() > (pred[3] ^ truth[3]).sum()  # the old rule's choice: slice 8
    z, point, kind = largest_error_click(pred, truth)
    assert kind == 1 and z in (3, 4)  # the middle of the missed stretch, a foreground click
    assert truth[z, int(point[0]), int(point[1])] and not pred[z, int(point[0]), int(point[1])]
    assert 12 <= point[0] <= 17 and 12 <= point[1] <= 17  # deepest inside it


def test_a_background_click_where_the_largest_error_is_a_false_positive():
    truth = np.zeros((6, 20, 20), bool)
    truth[:, 8:12, 8:12] = True
    pred = truth.copy()
    pred[1:5, 0:6, 0:20] = True
    z, point, kind = largest_error_click(pred, truth)
    assert kind == 0 and pred[z, int(point[0]), int(point[1])] and not truth[z, int(point[0]), int(point[1])]
    assert largest_error_click(truth, truth) is None


def test_the_area_under_the_rounds():
    assert area_under_rounds([0.5]) == 0.0
    assert area_under_rounds([0.5, 0.7, 0.9]) == pytest.approx(0.6 + 0.8)
