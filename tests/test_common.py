"""The common layer: the ramp schedule, bootstrap resampling, and the atomic writes of every report."""

from __future__ import annotations

import json
import resource
import signal

import numpy as np
import pytest

from madistill.common.bootstrap import resample
from madistill.common.schedules import linear_ramp
from madistill.selection import BestPolicy, Validation


def test_linear_ramp_grows_from_zero_then_holds():
    assert [linear_ramp(0.4, done, 10) for done in (0, 5, 10, 20)] == [0.0, 0.2, 0.4, 0.4]
    assert linear_ramp(0.4, 0, 0) == 0.4  # no ramp: the full value from the start


def test_resample_keeps_each_stratum_in_place():
    x = np.array([1.0, 2.0, 10.0, 20.0, 30.0])
    draws = resample(x, 50, np.random.default_rng(0), strata=["a", "a", "b", "b", "b"])
    assert draws.shape == (50, 5)
    assert set(draws[:, :2].ravel()) <= {1.0, 2.0} and set(draws[:, 2:].ravel()) <= {10.0, 20.0, 30.0}
    plain = resample(x, 50, np.random.default_rng(0))
    assert np.array_equal(plain, x[np.random.default_rng(0).integers(0, 5, (50, 5))])


def test_a_selection_report_that_cannot_be_written_leaves_the_old_one_whole(tmp_path):
    best = BestPolicy.__new__(BestPolicy)  # only the state save() reads
    best.best, best.history = Validation(0, 1.0, 0.5, 0.75), [Validation(step, 1.0, 0.5, 0.75) for step in range(200)]
    best.episodes, best.seed, best.weight, best.attacks = 4, 0, 0.5, {}
    path = tmp_path / "reports" / "selection.json"
    path.parent.mkdir()
    path.write_text('{"old": true}')
    # a full disk, simulated with a file-size limit smaller than the report
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))
    try:
        with pytest.raises(OSError):
            best.save(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in path.parent.iterdir()] == ["selection.json"]  # no temporary file left behind
    assert json.loads(best.save(path).read_text())["chosen"]["score"] == 0.75


def test_interrupts_held_while_a_checkpoint_is_saved_do_not_stop_it(capsys):
    import os
    import time

    from madistill.interrupts import held

    saved = []
    with held("saving the checkpoint first"):
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while the checkpoint is written
        time.sleep(0.01)
        saved.append(True)
    assert saved == [True] and "saving the checkpoint first" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back after the block
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)


def test_a_long_name_is_shortened_for_a_file_distinctly_and_a_short_one_kept():
    from madistill.names import short_name

    assert short_name("eval_teacher") == "eval_teacher"
    a, b = short_name("x" * 300 + "a"), short_name("x" * 300 + "b")
    assert a != b and len(a.encode()) == len(b.encode()) == 113 and a.startswith("x" * 100)
    assert len(short_name("é" * 300).encode()) <= 113  # cut at a whole character


def test_reports_are_strict_json_with_null_where_a_value_is_undefined():
    from madistill.common.io import strict_json

    text = strict_json({"influence": {"a": {"b": [0.5, float("nan")]}}, "flipped": np.float64("inf"), "n": 3})

    def refuse(name: str) -> None:
        raise ValueError(name)

    assert json.loads(text, parse_constant=refuse) == {"influence": {"a": {"b": [0.5, None]}}, "flipped": None, "n": 3}
