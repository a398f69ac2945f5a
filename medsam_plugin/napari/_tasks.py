"""Run a progress generator off the GUI thread (napari `thread_worker`) or inline.

The engine's long work is a generator that yields `Progress` and returns a result
(stardist-napari's pattern). `start_task` wraps it in a napari `thread_worker` with a napari
progress bar, shown from the work's first progress report; with `MEDSAM_PLUGIN_INLINE=1` (or `inline=True`) it runs in the calling thread,
which makes debugging and tests deterministic. The callbacks always run in the GUI thread.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Generator


def inline_default() -> bool:
    return os.environ.get("MEDSAM_PLUGIN_INLINE", "").strip().lower() in ("1", "true", "yes", "on")


class Task:
    """A running (or finished) piece of long work, cancellable at its next yield."""

    def __init__(self, description: str):
        self.description = description
        self.cancel_event = threading.Event()
        self.worker = None  # the napari worker, when threaded
        self.finished = threading.Event()
        self.pbar = None
        self.described_at: float | None = None  # when the bar's text was last redrawn
        self.reports = 0  # progress reports received (numbers them, see start_task)

    def cancel(self) -> None:
        self.cancel_event.set()
        if self.worker is not None:
            self.worker.quit()

    @property
    def running(self) -> bool:
        return not self.finished.is_set()


def _progress_bar(description: str):
    try:
        from napari.utils import progress

        return progress(total=0, desc=description)
    except Exception:  # pragma: no cover - a missing progress bar must not stop the work
        return None


# napari redraws the whole window when a bar's text changes (about 25 ms): at most this often.
DESCRIPTION_INTERVAL_S = 0.25


def _update_bar(task: Task, value) -> None:
    pbar = task.pbar
    if pbar is None:
        return
    done, total = getattr(value, "done", None), getattr(value, "total", None)
    if total is not None and total != pbar.total:
        pbar.total = int(total)
    if done is not None:
        pbar.n = int(done)
        message = getattr(value, "message", "")
        now = time.monotonic()
        final = total is not None and int(done) >= int(total)
        if message and (task.described_at is None or final or now - task.described_at >= DESCRIPTION_INTERVAL_S):
            pbar.set_description(message)
            task.described_at = now
        pbar.refresh()


def start_task(
    make_generator: Callable[[threading.Event], Generator],
    description: str,
    on_yield: Callable | None = None,
    on_return: Callable | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finish: Callable[[bool], None] | None = None,
    inline: bool | None = None,
) -> Task:
    """Start `make_generator(cancel_event)` and feed its yields/return to the callbacks.

    on_finish(cancelled) runs last in every case (success, error or cancel).
    Heavy imports belong inside the generator, so they happen in the worker thread.
    """
    task = Task(description)
    inline = inline_default() if inline is None else inline

    making_bar = [False]

    def yielded(value):
        task.reports += 1
        mine = task.reports
        # The bar appears with the first progress report, so work that reports none (a re-prompt
        # on a cached slice, 30-40 ms) is not slowed by building one: a napari bar costs ~60 ms.
        if task.pbar is None and not task.finished.is_set() and not making_bar[0]:
            making_bar[0] = True
            try:
                task.pbar = _progress_bar(description)
            finally:
                making_bar[0] = False
        # Building (or redrawing) napari's bar runs Qt events: later reports, even the end of the
        # task, can be handled inside this call. A report overtaken that way, or arriving after
        # the end, is dropped, so callbacks see reports in order and none after on_finish.
        if mine < task.reports or task.finished.is_set():
            return
        _update_bar(task, value)
        if on_yield is not None and mine == task.reports and not task.finished.is_set():
            on_yield(value)

    def close():
        if task.pbar is not None:
            task.pbar.close()
            task.pbar = None
        task.finished.set()

    if inline:
        cancelled = False
        try:
            gen = make_generator(task.cancel_event)
            while True:
                if task.cancel_event.is_set():
                    gen.close()
                    cancelled = True
                    break
                try:
                    value = next(gen)
                except StopIteration as stop:
                    if on_return is not None:
                        on_return(stop.value)
                    break
                yielded(value)
        except Exception as exc:  # the engine's cancel exception counts as a cancel
            if type(exc).__name__ == "PropagationCancelled" or task.cancel_event.is_set():
                cancelled = True
            elif on_error is not None:
                on_error(exc)
            else:
                raise
        finally:
            close()
        if on_finish is not None:
            on_finish(cancelled)
        return task

    from napari.qt.threading import create_worker

    state = {"errored": False}

    def returned(value):
        if on_return is not None and not task.cancel_event.is_set():
            on_return(value)

    def errored(exc):
        state["errored"] = True
        if type(exc).__name__ == "PropagationCancelled" or task.cancel_event.is_set():
            return
        if on_error is not None:
            on_error(exc)

    def finished():
        close()
        if on_finish is not None:
            on_finish(task.cancel_event.is_set())

    def generator_function():
        # a plain generator function, so napari makes a GeneratorWorker (quit() works at yields)
        result = yield from make_generator(task.cancel_event)
        return result

    # errors go to on_error (a notification with advice), not to napari's traceback dialog
    worker = create_worker(generator_function, _start_thread=False, _ignore_errors=True)
    worker.yielded.connect(yielded)
    worker.returned.connect(returned)
    worker.errored.connect(errored)
    worker.finished.connect(finished)
    task.worker = worker
    worker.start()
    return task
