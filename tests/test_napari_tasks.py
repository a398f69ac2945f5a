"""`start_task`: callbacks in order, and a progress bar only for work that reports progress."""

from __future__ import annotations

from types import SimpleNamespace

from medsam_plugin.napari import _tasks


class _Bar:
    def __init__(self, made):
        made.append(self)
        self.total, self.n, self.closed, self.descriptions = 0, 0, False, []

    def set_description(self, text):
        self.description = text
        self.descriptions.append(text)

    def refresh(self):
        pass

    def close(self):
        self.closed = True


def _run(monkeypatch, steps):
    made, seen = [], []
    monkeypatch.setattr(_tasks, "_progress_bar", lambda description: _Bar(made))

    def work(cancel):
        for i in range(steps):
            yield SimpleNamespace(done=i + 1, total=steps, message=f"step {i + 1}")
        return "result"

    task = _tasks.start_task(work, "test work", on_yield=seen.append, on_return=seen.append,
                             on_finish=lambda cancelled: seen.append(("finished", cancelled)), inline=True)
    return task, made, seen


def test_quick_work_that_reports_nothing_builds_no_progress_bar(monkeypatch):
    task, made, seen = _run(monkeypatch, steps=0)
    assert made == [] and task.pbar is None
    assert seen == ["result", ("finished", False)] and not task.running


def test_reported_progress_gets_one_bar_that_follows_it_and_closes(monkeypatch):
    task, made, seen = _run(monkeypatch, steps=3)
    assert len(made) == 1
    bar = made[0]
    assert (bar.n, bar.total, bar.description, bar.closed) == (3, 3, "step 3", True)
    assert task.pbar is None and seen[-2:] == ["result", ("finished", False)]


def test_bar_text_is_redrawn_at_most_four_times_a_second_but_always_at_the_end(monkeypatch):
    clock = iter([0.0, 0.1, 0.2, 0.3, 0.4, 0.45])  # one reading per step
    monkeypatch.setattr(_tasks.time, "monotonic", lambda: next(clock))
    _, made, _ = _run(monkeypatch, steps=6)
    # 0.0 first; 0.3 is 0.25 s after it; the last step always
    assert made[0].descriptions == ["step 1", "step 4", "step 6"]


def test_reports_handled_inside_building_the_bar_reach_callbacks_in_order_and_none_after_the_end(monkeypatch,
                                                                                                   qtbot):
    """Building napari's bar runs Qt events, so later reports (and the task's end) can be handled
    inside the first report's handler: what the widget draws must still be in order, and nothing
    may come after on_finish (a late preview would stay in the labels after a cancel)."""
    import threading
    import time

    import pytest

    pytest.importorskip("napari")
    from qtpy.QtWidgets import QApplication

    made, seen = [], []
    done = threading.Event()

    def slow_bar(description):  # like napari's: it processes events while it is built
        done.wait(5)
        time.sleep(0.05)
        QApplication.processEvents()
        return _Bar(made)

    monkeypatch.setattr(_tasks, "_progress_bar", slow_bar)

    def work(cancel):
        for i in range(5):
            yield SimpleNamespace(done=i + 1, total=5, message=f"step {i + 1}")
        done.set()
        return "result"

    task = _tasks.start_task(work, "test work", on_yield=lambda v: seen.append(v.done),
                             on_finish=lambda cancelled: seen.append("finished"), inline=False)
    qtbot.waitUntil(lambda: task.finished.is_set() and "finished" in seen, timeout=10_000)
    qtbot.wait(100)
    numbers = [v for v in seen if v != "finished"]
    assert numbers == sorted(numbers) and seen[-1] == "finished"
