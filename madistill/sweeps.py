"""A sweep's record of its jobs, so that ``madistill <stage> -m ...`` can say after the last job where the sweep
is and what became of every job (failed, interrupted, never started), and so that an interrupted sweep starts
no new job; and where Ctrl-C and SIGTERM reach a sweep's processes.

The record is one file of JSON lines that ``main()`` creates and names in an environment variable, as a
launcher's jobs may run in other processes (``+launcher=local``). A job appends one line when it ends; the
process that launched the sweep appends one when it is interrupted. A job on another machine finds no file
(it is never created there) and is left to Hydra's own report.

Interrupts: the terminal's Ctrl-C and a cluster's SIGTERM reach every process of a sweep. A running stage takes
them as KeyboardInterrupt (``madistill.interrupts``): it saves its checkpoint and ends, and its job is recorded as
interrupted, so no new job starts. The launching process marks the sweep interrupted at the first and stops at
the second (:func:`interrupt_sweep`). A job process of a launcher's pool (``+launcher=local``) ignores them
from its start and between jobs (:func:`pool_ignores_interrupts`), as the pool would take such a process's end
for a crash and end the other jobs with it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from madistill.interrupts import ignore_interrupts

ENV_VAR = "MADISTILL_SWEEP_JOBS"

# what became of a job
DONE, FAILED, INTERRUPTED, NOT_STARTED = "done", "failed", "interrupted", "not started"
_INTERRUPTED_HERE: list[int] = []  # the signals that interrupted the sweep this process launches


@contextlib.contextmanager
def pool_ignores_interrupts() -> Iterator[None]:
    """While a sweep launches its jobs: the processes of joblib's loky pool (``+launcher=local``, Hydra's joblib
    launcher) start with :func:`madistill.interrupts.ignore_interrupts` as their initializer, through the backend
    the launcher names, so they ignore Ctrl-C and SIGTERM but while a job's stage runs (``interrupts.handled``
    brings the ignoring back after it)."""
    from joblib import parallel
    from joblib._parallel_backends import LokyBackend

    original = parallel.BACKENDS["loky"]
    parallel.BACKENDS["loky"] = functools.partial(LokyBackend, initializer=ignore_interrupts)
    try:
        yield
    finally:
        parallel.BACKENDS["loky"] = original


class _UnstartedJobsUnlogged(logging.Filter):
    """Drops Hydra's in-process launcher line ``#<n> : <overrides>`` of a job that will not start, the sweep
    being interrupted: the sweep's report counts it as not started, and the line said otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().lstrip().startswith("#") and interrupted())


@contextlib.contextmanager
def unstarted_jobs_unlogged() -> Iterator[None]:
    """While a sweep launches its jobs in this process: no launch line for the jobs an interrupt keeps from
    starting."""
    launcher = logging.getLogger("hydra._internal.core_plugins.basic_launcher")
    dropping = _UnstartedJobsUnlogged()
    launcher.addFilter(dropping)
    try:
        yield
    finally:
        launcher.removeFilter(dropping)


@contextlib.contextmanager
def launching() -> Iterator[None]:
    """While a sweep launches its jobs: :func:`pool_ignores_interrupts` and :func:`unstarted_jobs_unlogged`."""
    with pool_ignores_interrupts(), unstarted_jobs_unlogged():
        yield


def interrupt_sweep(signum: int, frame: object) -> None:
    """The launching process's handler: the first interrupt marks the sweep interrupted (running jobs, which get
    it too, save their checkpoints and end; no new job starts), a second one stops the launcher at once."""
    if _INTERRUPTED_HERE:  # this process marks the record: a second interrupt of its own
        raise KeyboardInterrupt
    _INTERRUPTED_HERE.append(signum)
    mark_interrupted()
    print("madistill: interrupting the sweep: running jobs save their checkpoints and end, no new job starts "
          "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def sweep_record() -> Iterator[Path]:
    """A fresh record for the jobs this process launches, named in the environment while they run."""
    fd, name = tempfile.mkstemp(prefix="madistill-sweep-", suffix=".jsonl")
    os.close(fd)
    outer = os.environ.get(ENV_VAR)  # a madistill run inside a sweep's job: that sweep's record, restored after
    os.environ[ENV_VAR] = name
    _INTERRUPTED_HERE.clear()
    try:
        yield Path(name)
    finally:
        if outer is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = outer
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
