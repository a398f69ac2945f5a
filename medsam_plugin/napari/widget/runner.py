"""Background work: one long task at a time off the GUI thread (`.._tasks.start_task`), with its busy state.

The controller hands it a progress generator (load the model, encode, propagate...) and the
callbacks that show the result; the runner reports when work starts and ends (`on_busy`, so the
panel greys its actions and the Labels layer stops taking paint), feeds each progress report to
`on_progress`, and words a failure once (`on_error`). Callbacks always run in the GUI thread.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from .._tasks import Task, start_task

log = logging.getLogger(__name__)


class TaskRunner:
    """Runs one task at a time.

    Args:
        inline: run in the calling thread (tests, debugging); None: $MEDSAM_PLUGIN_INLINE.
        on_busy(busy, description): work started (True) or ended (False).
        on_progress(progress, started): each progress report, with the task's start (perf_counter).
        on_error(description, exc): the work failed (not called for a cancel).
    """

    def __init__(self, inline: bool | None, on_busy: Callable, on_progress: Callable, on_error: Callable):
        self.inline = inline
        self.on_busy, self.on_progress, self.on_error = on_busy, on_progress, on_error
        self.task: Task | None = None

    @property
    def busy(self) -> bool:
        return self.task is not None and self.task.running

    def run(self, make_gen, description: str, on_yield=None, on_return=None, on_finish=None) -> Task:
        """Start `make_gen(cancel_event)`; `on_finish(cancelled)` runs last in every case."""
        self.on_busy(True, description)
        started = time.perf_counter()

        def yielded(progress):
            self.on_progress(progress, started)
            if on_yield is not None:
                on_yield(progress)

        def failed(exc):
            log.exception("%s failed", description, exc_info=exc)
            self.on_error(description, exc)

        def finished(cancelled):
            self.on_busy(False, description)
            if on_finish is not None:
                on_finish(cancelled)

        self.task = start_task(make_gen, description, on_yield=yielded, on_return=on_return, on_error=failed,
                               on_finish=finished, inline=self.inline)
        return self.task

    def wait(self, timeout_s: float = 120.0) -> bool:
        """Block (processing Qt events) until the running task ends; True when it ended."""
        from qtpy.QtWidgets import QApplication

        end = time.perf_counter() + timeout_s
        while self.busy and time.perf_counter() < end:
            QApplication.processEvents()
            time.sleep(0.005)
        QApplication.processEvents()
        return not self.busy

    def cancel(self) -> str | None:
        """Ask the running task to stop at its next step; returns its description, or None when idle."""
        if not self.busy:
            return None
        self.task.cancel()
        return self.task.description
