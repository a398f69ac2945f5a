"""Fine-tune on the done cases of a dataset, in a background process that can be cancelled and resumed.

`plan_finetune(dataset)` holds out some done cases for validation (every `val_every`-th in name
order, at least one) and writes the split as a datalist under ``.medsam/finetune/``.
`FinetuneJob(plan, ...).run(cancel)` is a generator (the engine's progress pattern) that runs
``medsam-plugin finetune --objective interactive`` on that datalist in a child process: it yields
`Progress` from the trainer's log lines, stops the child with an interrupt when `cancel` is set
(the trainer's checkpoint and resume state are written atomically, so a cancel leaves the last
ones whole), and returns a `FinetuneOutcome` with the validation Dice before training (the stock
model, step 0) and after (the best checkpoint). A later run with ``resume=True`` continues from
the resume state. The trained model is registered with the dataset by its path.

A child process, not a thread: the GUI stays responsive while torch uses its threads, a cancel
cannot leave torch half-way through a step in the GUI's process, and the same command runs
from a shell.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator

from ..engine.propagation import Progress
from ..io.atomic import atomic_write_json
from .store import Dataset, DatasetError, _rel

STEP_LINE = re.compile(r"^step (\d+)(?:/(\d+))?[: ]")
BANK_LINE = re.compile(r"^slice bank: (\d+) slices")


class FinetuneCancelled(Exception):
    """The fine-tune was cancelled; its last checkpoint and resume state are kept for a resume."""


@dataclass
class FinetunePlan:
    datalist: Path
    out: Path
    train_cases: list[str]
    val_cases: list[str]

    @property
    def resume_path(self) -> Path:
        return self.out.with_name(self.out.name + ".resume.pt")

    @property
    def report_path(self) -> Path:
        return self.out.with_name(self.out.name + ".report.json")

    @property
    def can_resume(self) -> bool:
        return self.resume_path.is_file()


@dataclass
class FinetuneOutcome:
    checkpoint: Path
    stopped: str
    steps: int
    before: dict = field(default_factory=dict)  # validation scores of the starting model (step 0)
    after: dict = field(default_factory=dict)  # those of the saved (best) checkpoint
    val_cases: list[str] = field(default_factory=list)

    def sentence(self) -> str:
        def pick(d):
            return ", ".join(f"{k} {d[k]:.3f}" for k in ("box", "click", "score") if isinstance(d.get(k), (int, float)))

        return (f"Validation Dice on {len(self.val_cases)} held-out case(s) ({', '.join(self.val_cases)}): before "
                f"{pick(self.before) or 'n/a'}; after {pick(self.after) or 'n/a'} ({self.stopped}, {self.steps} steps).")


def plan_finetune(dataset: Dataset, out: str | os.PathLike | None = None, val_every: int = 5) -> FinetunePlan:
    """Split the done cases into training and validation and write that datalist; DatasetError when
    fewer than two cases are done (one to learn from, one to measure on)."""
    dataset.refresh()
    done = dataset.done_cases()
    if len(done) < 2:
        raise DatasetError(f"Training needs at least 2 done cases (one is held out to measure the model); "
                           f"{len(done)} {'is' if len(done) == 1 else 'are'} done. Annotate more cases first.")
    val = [c for i, c in enumerate(done) if i % val_every == val_every - 1] or [done[-1]]
    train = [c for c in done if c not in val]
    folder = dataset.meta / "finetune"
    folder.mkdir(parents=True, exist_ok=True)
    raw = json.loads(dataset.datalist_path.read_text(encoding="utf-8")) if dataset.datalist_path.is_file() else {}
    entries = {(dataset.root / str(t.get("image"))).resolve(): t for t in raw.get("training", []) if isinstance(t, dict)}

    def item(c):
        entry = {"image": str(c.image), "label": str(c.label), "name": c.name}
        modality = entries.get(c.image, {}).get("modality")
        if modality:
            entry["modality"] = modality
        return entry

    datalist = {"name": f"{dataset.root.name} (done cases)", "labels": raw.get("labels", {}),
                "modality": raw.get("modality", {}), "training": [item(c) for c in train],
                "validation": [item(c) for c in val]}
    path = folder / "datalist.json"
    atomic_write_json(path, datalist)
    out = Path(out) if out else dataset.meta / "models" / f"{dataset.root.name}_interactive.pth"
    out.parent.mkdir(parents=True, exist_ok=True)
    return FinetunePlan(path, out, [c.name for c in train], [c.name for c in val])


@dataclass
class FinetuneJob:
    """One fine-tune of `plan` (see the module's docstring). `steps`, `max_minutes`, `val_every`,
    `threads`, `base_model` and `extra` (more CLI flags) go to ``medsam-plugin finetune``."""

    plan: FinetunePlan
    base_model: str = "medsam_interactive"
    steps: int = 200
    max_minutes: float | None = 10.0
    val_every: int = 50
    threads: int | None = None
    resume: bool = False
    extra: tuple[str, ...] = ("--views", "axial", "--variants", "1", "--slices-per-variant", "8")
    log: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        p = self.plan
        cmd = [sys.executable, "-m", "medsam_plugin.cli", "finetune", "--objective", "interactive",
               "--datalist", str(p.datalist), "--out", str(p.out), "--model", self.base_model,
               "--steps", str(self.steps), "--val-every", str(self.val_every), "--json", str(p.report_path),
               "--cache-dir", str(p.out.parent / "embeddings"), *self.extra]
        if self.max_minutes:
            cmd += ["--max-minutes", f"{self.max_minutes:g}"]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if self.resume:
            if not p.can_resume:
                raise DatasetError(f"There is no earlier run to resume ({p.resume_path} is missing); start a new one.")
            cmd.append("--resume")
        return cmd

    def run(self, cancel: threading.Event | None = None) -> Generator[Progress, None, FinetuneOutcome]:
        """Run the fine-tune; yields Progress(done steps, total steps, last log line)."""
        cancel = cancel or threading.Event()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        if self.plan.report_path.exists() and not self.resume:
            self.plan.report_path.unlink()
        kwargs = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # a Ctrl+C in the terminal that started napari is not ours
        proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace", env=env, bufsize=1, **kwargs)
        lines: list[str] = []
        reader = threading.Thread(target=_pump, args=(proc, lines), daemon=True)
        reader.start()
        done, seen = 0, 0
        interrupted = False
        try:
            yield Progress(0, self.steps, "loading the model and encoding the slices")
            while proc.poll() is None or reader.is_alive() or seen < len(lines):
                if cancel.is_set() and not interrupted and proc.poll() is None:
                    interrupted = True
                    _interrupt(proc)
                while seen < len(lines):
                    line = lines[seen].strip()
                    seen += 1
                    self.log.append(line)
                    m = STEP_LINE.match(line)
                    if m:
                        done = max(done, int(m.group(1)))
                    if line:
                        yield Progress(min(done, self.steps), self.steps, line[:120])
                if proc.poll() is not None and not reader.is_alive():
                    continue
                time.sleep(0.1)
                if interrupted and proc.poll() is None and time.monotonic() - _interrupted_at(proc) > 30:
                    proc.kill()  # a trainer that did not stop within 30 s of the interrupt
        finally:
            # closed at a yield (napari's worker.quit(), gen.close()) or failed: the child must not run on
            if proc.poll() is None:
                interrupted = True
                _interrupt(proc)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        rc = proc.wait()
        if interrupted or cancel.is_set():
            raise FinetuneCancelled(f"Training was cancelled at step {done}; press Train again with 'resume' to go on "
                                    f"from the last saved step.")
        if rc != 0:
            tail = " ".join(l for l in self.log[-3:] if l)
            raise RuntimeError(f"Training failed (exit status {rc}): {tail}")
        return self.outcome()

    def outcome(self) -> FinetuneOutcome:
        report = json.loads(self.plan.report_path.read_text(encoding="utf-8"))
        history = report.get("history", [])
        before = next((h.get("val", {}) for h in history if h.get("step") == 0), {})
        best = report.get("best_score")
        after = next((h.get("val", {}) for h in history if h.get("step") and h.get("val", {}).get("score") == best),
                     history[-1].get("val", {}) if history else {})
        return FinetuneOutcome(Path(report["checkpoint"]), str(report.get("stopped")), int(report.get("steps", 0)),
                               before, after, list(self.plan.val_cases))


_INTERRUPTED: dict[int, float] = {}


def _interrupt(proc: subprocess.Popen) -> None:
    """Ask the child to stop as Ctrl+C would (the CLI then exits with 'cancelled'); Windows: terminate."""
    _INTERRUPTED[proc.pid] = time.monotonic()
    try:
        if os.name == "posix":
            proc.send_signal(signal.SIGINT)
        else:  # pragma: no cover
            proc.terminate()
    except ProcessLookupError:
        pass


def _interrupted_at(proc: subprocess.Popen) -> float:
    return _INTERRUPTED.get(proc.pid, time.monotonic())


def _pump(proc: subprocess.Popen, lines: list[str]) -> None:
    """Collect the child's output lines (tqdm's carriage-return updates split into lines)."""
    assert proc.stdout is not None
    for chunk in proc.stdout:
        lines.extend(part for part in chunk.replace("\r", "\n").split("\n") if part.strip())


def finetune_dataset(dataset: Dataset, cancel=None, log: list | None = None,
                     **job_kwargs) -> Generator[Progress, None, FinetuneOutcome]:
    """Plan, run and register a fine-tune on the dataset's done cases (resume with resume=True);
    `log` receives the trainer's output lines."""
    plan = plan_finetune(dataset)
    job = FinetuneJob(plan, **job_kwargs)
    if log is not None:
        job.log = log
    outcome = yield from job.run(cancel)
    dataset.register_model(outcome.checkpoint, {"base": job.base_model, "before": outcome.before,
                                                "after": outcome.after, "train_cases": plan.train_cases,
                                                "val_cases": plan.val_cases, "steps": outcome.steps,
                                                "stopped": outcome.stopped,
                                                "datalist": _rel(plan.datalist, dataset.root)})
    return outcome
