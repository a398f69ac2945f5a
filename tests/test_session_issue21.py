"""Issue 21 rules that live in the core (no Qt): redoing an undone preview, the preview's volume."""

from __future__ import annotations

import numpy as np

from fakes import ellipsoid_zyx
from medsam_plugin.engine.propagation import bounding_box_xyxy
from test_session_interaction import make_session

TRUTH = ellipsoid_zyx(shape=(20, 40, 48), center=(10, 20, 24), radii=(6, 12, 15))


def held(s, obj, z=10):
    pred = s.segment_slice(obj, z, box_xyxy=bounding_box_xyxy(TRUTH[z]), commit=False)
    s.hold_pending(obj, pred)
    return pred


def test_an_undone_preview_can_be_redone():
    s = make_session(TRUTH.copy())
    obj = s.add_object("blob").label_id
    pred = held(s, obj)
    assert s.undo().startswith("the preview") and s.pending is None
    assert s.can_redo
    assert s.redo().startswith("the preview") and s.pending == (obj, pred)
    assert not s.can_redo and s.can_undo
    s.accept_pending()
    assert s.labels.array[10].any()


def test_redo_keeps_the_order_of_undo():
    s = make_session(TRUTH.copy())
    obj = s.add_object("blob").label_id
    held(s, obj, 8)
    s.accept_pending()  # slice 8 in the history
    pred = held(s, obj, 10)
    s.undo()  # the preview of slice 10
    s.undo()  # slice 8
    assert not s.labels.array.any()
    s.redo()  # slice 8 first...
    assert s.labels.array[8].any() and s.pending is None
    s.redo()  # ...then the preview
    assert s.pending == (obj, pred) and not s.can_redo


def test_a_new_change_ends_the_redo_of_a_preview():
    s = make_session(TRUTH.copy())
    obj = s.add_object("blob").label_id
    held(s, obj)
    s.undo()
    held(s, obj, 12)  # a new result
    s.undo()
    assert s.redo() and s.pending[1].z == 12 and not s.can_redo
    s.undo()
    s.labels.array  # a brush stroke after the undo changes the history: no redo of the preview
    painted = s.labels.array.copy()
    painted[3, 5:9, 5:9] = obj
    s.paint(painted)
    assert not s.can_redo and s.redo() is None and s.pending is None
    s2 = make_session(TRUTH.copy())
    o2 = s2.add_object("b").label_id
    held(s2, o2)
    s2.undo()
    s2.remove_object(o2)  # its object gone
    assert not s2.can_redo


def test_the_weak_answer_rule():
    from medsam_plugin.engine.advice import WEAK_ANSWER_IOU, is_weak, weak_answer_note

    assert 0.3 < WEAK_ANSWER_IOU < 0.95  # chosen from data (benchmarks/weak_answer.py), not a stub
    assert is_weak(WEAK_ANSWER_IOU - 0.01) and not is_weak(WEAK_ANSWER_IOU)
    assert weak_answer_note(WEAK_ANSWER_IOU, had_box=False) == ""
    click = weak_answer_note(0.35, had_box=False)
    assert "unsure" in click and "0.35" in click and "draw a box" in click and "add a click" in click
    assert weak_answer_note(0.35, had_box=True) == ""  # measured: predicted IoU does not sort box answers
