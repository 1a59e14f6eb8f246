"""Policies compared on the same cascades: the paired difference from the teacher (``madistill.cascade.report``) and
its pooling over seeds in experiments/cascade_compare.py, on hand-made per-episode values."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO

from madistill.cascade.report import baseline, compare, comparison

T_975_2 = 4.302652729911275  # Student's t quantile 0.975 with two degrees of freedom (three seeds)


def _results(sizes: dict[str, list[float]], deltas: dict[str, list[float]], seeds: list[int]) -> dict:
    """Cascade results per policy as ``reports/cascade.json`` holds them, one fault."""
    return {p: {"seeds": seeds, "faults": {"dead@a": {"cascade": {
        "sizes": sizes[p], "others_return_deltas": deltas[p], "others_clean_returns": [-10.0] * len(seeds)}}}} for p in sizes}


@pytest.fixture
def cascade_compare(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import cascade_compare

    return cascade_compare


def test_each_policy_is_compared_with_its_own_runs_teacher():
    labels = ["teacher@s0", "student@s0", "teacher@s1", "student@s1", "robust@s2"]
    assert [baseline(x, labels) for x in labels] == ["teacher@s0", "teacher@s0", "teacher@s1", "teacher@s1", "teacher@s0"]
    # a teacher's run beside its students' runs: the only teacher
    assert baseline("student@distill", ["student@distill", "teacher@train"]) == "teacher@train"
    assert baseline("robust", ["teacher", "digr", "robust"]) == "teacher"
    assert baseline("b", ["a", "b"]) == "a" and baseline("a", ["a", "b"]) == "a"


def test_the_difference_is_paired_episode_by_episode():
    # the student's cascade is one smaller in every episode: the paired CI is exactly [-1, -1], although the
    # sizes vary a lot from episode to episode
    res = _results({"teacher": [2, 1, 2, 1], "student": [1, 0, 1, 0]}, {"teacher": [0, -2, 0, -2], "student": [1, -1, 0, -2]},
                   [7, 8, 9, 10])
    c = compare(res, 200, 0.95)["dead@a"]
    assert c["teacher"]["baseline"] is None and "size_diff" not in c["teacher"]
    d = c["student"]["size_diff"]
    assert c["student"]["baseline"] == "teacher" and (d["mean"], d["lo"], d["hi"], d["n"]) == (-1.0, -1.0, -1.0, 4)
    assert c["student"]["size"]["mean"] == 0.5 and c["student"]["size"]["lo"] < c["student"]["size"]["hi"]
    assert c["student"]["others_return_delta_diff"]["mean"] == 0.5
    md = comparison({"dead@a": c})
    assert "| dead@a | student | 0.50 [" in md and "| teacher | -1.00 [-1.00, -1.00] | +0.500 [" in md
    assert c["student"]["others_clean_return"]["mean"] == -10.0 and md.count("| -10.00 [-10.00, -10.00] |") == 2
    assert c["student"]["others_faulted_return_diff"]["mean"] == 0.5  # equal clean returns: the delta's difference


def test_seeds_pool_with_episodes_resampled_within_each_seed(cascade_compare):
    # seed 0's student is one smaller in every episode, seed 1's equal, seed 2's one larger
    by_seed = {s: _results({"teacher": [1, 1], "student": [1 - d, 1 - d]}, {"teacher": [0, 0], "student": [d, 3 * d]}, [5, 6])
               for s, d in ((0, 1), (1, 0), (2, -1))}
    row = cascade_compare.pooled(by_seed, 300)["dead@a"]["student"]
    d = row["size_diff"]
    # within each seed every episode's difference is the same, so the within-seed bootstrap cannot move the mean
    assert (d["mean"], d["lo"], d["hi"], d["n"]) == (0.0, 0.0, 0.0, 6)
    seeds = row["seeds"]["size_diff"]
    assert seeds["per_seed"] == [-1.0, 0.0, 1.0]
    assert (seeds["mean"], seeds["lo"], seeds["hi"]) == pytest.approx((0.0, -T_975_2 / np.sqrt(3), T_975_2 / np.sqrt(3)))
    assert row["seeds"]["others_return_delta"]["per_seed"] == [2.0, 0.0, -2.0]
    assert row["others_return_delta"]["mean"] == 0.0 and row["others_return_delta"]["lo"] < 0 < row["others_return_delta"]["hi"]
    lines = cascade_compare.verdicts({"dead@a": {"student": row}})
    assert lines[0].startswith("- dead@a, student - teacher: cascade size +0.00 [+0.00, +0.00] (no clear difference; "
                               "over seeds +0.00 [-2.48, +2.48]: no clear difference); others' return loss +0.000 [")


def test_seeds_of_other_episodes_are_refused(cascade_compare):
    res = {0: _results({"teacher": [1], "student": [0]}, {"teacher": [0], "student": [0]}, [5]),
           1: _results({"teacher": [1], "student": [0]}, {"teacher": [0], "student": [0]}, [6])}
    with pytest.raises(ValueError, match="seed 1's runs study other policies or episodes"):
        cascade_compare.pooled(res, 10)
