"""A sweep's record of its jobs, so that ``madistill <stage> -m ...`` can say after the last job where the sweep
is and what became of every job (failed, interrupted, never started), and so that an interrupted sweep starts
no new job; and where Ctrl-C and SIGTERM reach a sweep's processes.

The record is one file of JSON lines that ``main()`` creates and names in an environment variable, as a
launcher's jobs may run in other processes (``+launcher=local``). A job appends one line when it ends; the
process that launched the sweep appends one when it is interrupted. A job on another machine finds no file
(it is never created there) and is left to Hydra's own report.

Interrupts: the terminal's Ctrl-C and a cluster's SIGTERM reach every process of a sweep. A running stage takes
them as KeyboardInterrupt (:func:`job_interrupts`): it saves its checkpoint and ends, and its job is recorded as
interrupted, so no new job starts. The launching process marks the sweep interrupted at the first and stops at
the second (:func:`interrupt_sweep`). A job process of a launcher's pool (``+launcher=local``) ignores them
from its start and between jobs (:func:`pool_ignores_interrupts`), as the pool would take such a process's end
for a crash and end the other jobs with it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV_VAR = "MADISTILL_SWEEP_JOBS"
LAUNCHER_VAR = "MADISTILL_SWEEP_LAUNCHER"  # the launching process's pid: a job in another process is pooled

# what became of a job
DONE, FAILED, INTERRUPTED, NOT_STARTED = "done", "failed", "interrupted", "not started"
INTERRUPTS = {signal.SIGINT, signal.SIGTERM}  # Ctrl-C, and a cluster's time limit or scancel
_INTERRUPTED_HERE: list[int] = []  # the signals that interrupted the sweep this process launches


def raise_interrupt(signum: int, frame: object) -> None:
    """A signal handler: Ctrl-C's KeyboardInterrupt, for SIGTERM too (the training stages checkpoint on it)."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def job_interrupts() -> Iterator[None]:
    """While a stage runs, Ctrl-C and SIGTERM raise KeyboardInterrupt in it; after it, a job process of a
    launcher's pool ignores them (see the module doc). Signal handlers belong to the main thread: elsewhere the
    block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {s: signal.signal(s, raise_interrupt) for s in INTERRUPTS}
    pooled = os.environ.get(LAUNCHER_VAR) not in (None, str(os.getpid()))
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, signal.SIG_IGN if pooled else handler)


def ignore_interrupts() -> None:
    """A pool's job process at its start: Ctrl-C and SIGTERM are ignored until a job's stage takes them."""
    for s in INTERRUPTS:
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def pool_ignores_interrupts() -> Iterator[None]:
    """While a sweep launches its jobs: the processes of joblib's loky pool (``+launcher=local``, Hydra's joblib
    launcher) start with :func:`ignore_interrupts` as their initializer, through the backend the launcher names."""
    from joblib import parallel
    from joblib._parallel_backends import LokyBackend

    original = parallel.BACKENDS["loky"]
    parallel.BACKENDS["loky"] = functools.partial(LokyBackend, initializer=ignore_interrupts)
    try:
        yield
    finally:
        parallel.BACKENDS["loky"] = original


def interrupt_sweep(signum: int, frame: object) -> None:
    """The launching process's handler: the first interrupt marks the sweep interrupted (running jobs, which get
    it too, save their checkpoints and end; no new job starts), a second one stops the launcher at once."""
    if _INTERRUPTED_HERE or any(e.get("interrupt") for e in read()):
        raise KeyboardInterrupt
    _INTERRUPTED_HERE.append(signum)  # also where the record cannot be read any more
    mark_interrupted()
    print("madistill: interrupting the sweep: running jobs save their checkpoints and end, no new job starts "
          "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def sweep_record() -> Iterator[Path]:
    """A fresh record for the jobs this process launches, named in the environment while they run (with this
    process as their launcher)."""
    fd, name = tempfile.mkstemp(prefix="madistill-sweep-", suffix=".jsonl")
    os.close(fd)
    # a madistill run inside a sweep's job: that sweep's record and launcher, restored after
    outer = {v: os.environ.get(v) for v in (ENV_VAR, LAUNCHER_VAR)}
    os.environ.update({ENV_VAR: name, LAUNCHER_VAR: str(os.getpid())})
    _INTERRUPTED_HERE.clear()
    try:
        yield Path(name)
    finally:
        for v, value in outer.items():
            if value is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = value
        Path(name).unlink(missing_ok=True)


def _append(entry: dict[str, Any]) -> bool:
    """Append one line to the record; False where there is none (never created here: see the module doc)."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return False
    try:  # one write of the whole line: lines of jobs in parallel do not interleave
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)
    return True


def record_job(hc: Any, run_dir: Path, outcome: str, error: str | None = None) -> bool:
    """Append what became of the sweep job Hydra describes in ``hc`` (its number, directory, sweep directory and
    overrides); False where the record is not reachable from this job."""
    subdir_parts = len(Path(str(hc.sweep.subdir)).parts)
    return _append({"num": int(hc.job.num), "dir": str(run_dir),
                    "sweep": str(Path(*run_dir.parts[:len(run_dir.parts) - subdir_parts])),
                    "overrides": list(hc.overrides.task), "outcome": outcome, "error": error})


def mark_interrupted() -> None:
    """Record that the sweep was interrupted: jobs not yet begun then do not start."""
    _append({"interrupt": True})


def read(path: Path | None = None) -> list[dict[str, Any]]:
    """The record's lines (``path``, else this process's record); none where it cannot be read."""
    path = path or (Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None)
    try:
        text = path.read_text(encoding="utf-8") if path else ""
    except OSError:
        return []
    entries = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line a killed job left unfinished
            entries.append(json.loads(line))
    return entries


def interrupted() -> bool:
    """Whether the sweep this job belongs to was interrupted (by its launcher, or in one of its jobs)."""
    return any(e.get("interrupt") or e.get("outcome") == INTERRUPTED for e in read())


def report(stage: str, entries: list[dict[str, Any]], swept: set[str], resumes: bool, closing: bool = True) -> int:
    """Print where a sweep's jobs are and how many ended how; on stderr, one line per failed or interrupted job
    named by its swept settings (``swept``: the keys the command line sweeps), and (``closing``: the sweep ends
    here, not in an exception its caller reports) that it was interrupted. Returns the exit code: 130 when
    interrupted, 2 when a job failed, else 0 (0 too without jobs: nothing was swept)."""
    jobs = sorted((e for e in entries if "num" in e), key=lambda e: e["num"])
    if not jobs:
        return 0
    counts = {o: sum(e["outcome"] == o for e in jobs) for o in (FAILED, INTERRUPTED, NOT_STARTED)}
    tally = "".join(f", {n} {o}" for o, n in counts.items() if n)
    print(f"sweep: {', '.join(sorted({e['sweep'] for e in jobs}))} ({len(jobs)} job{'s' * (len(jobs) != 1)}{tally})")
    for e in jobs:
        if e["outcome"] not in (FAILED, INTERRUPTED):
            continue
        settings = " ".join(o for o in e["overrides"] if o.split("=", 1)[0].lstrip("+~") in swept)
        job = f"job {e['num']}" + (f" ({settings})" if settings else "")
        if e["outcome"] == FAILED:
            print(f"madistill {stage}: error: {job}: {e['error']}", file=sys.stderr)
        else:
            checkpoint = Path(e["dir"]) / "checkpoint"
            resume = f": resume it with teacher.resume={checkpoint}" if resumes and checkpoint.is_dir() else ""
            print(f"madistill {stage}: {job} interrupted{resume}", file=sys.stderr)
    if counts[INTERRUPTED] or any(e.get("interrupt") for e in entries):
        if closing:
            print(f"madistill {stage}: interrupted", file=sys.stderr)
        return 130
    return 2 if counts[FAILED] else 0
