"""Tests for madistill.evaluate.stats and madistill.evaluate.report (fast, no env needed)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from madistill.common.io import atomic_write_text
from madistill.errors import MadistillError
from madistill.evaluate.report import (
    markdown_table,
    read_json,
    write_json,
    write_markdown,
    write_marl_eval_json,
)
from madistill.evaluate.stats import (
    EpisodeRecord,
    bootstrap_ci,
    iqm,
    record_from_dict,
    record_to_dict,
    summarize,
)


def _records(n: int, seed: int = 0, agents: tuple[str, ...] = ("agent_0", "agent_1")) -> list[EpisodeRecord]:
    rng = np.random.default_rng(seed)
    return [
        EpisodeRecord(
            seed=i,
            length=int(rng.integers(10, 30)),
            agent_returns={a: float(rng.normal(loc=j, scale=1.0)) for j, a in enumerate(agents)},
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------- stats


def test_iqm_hand_computed():
    # n=8: trim int(0.25*8)=2 from each side -> mean(3, 4, 5, 6) = 4.5
    assert iqm(np.arange(1, 9)) == pytest.approx(4.5)
    # outliers are trimmed away entirely
    assert iqm(np.array([-1000.0, 3, 4, 5, 6, 7, 8, 1e6])) == pytest.approx(5.5)
    # n=4: middle two
    assert iqm([1.0, 2.0, 3.0, 100.0]) == pytest.approx(2.5)
    assert isinstance(iqm([1.0, 2.0]), float)
    # axis form used for vectorised bootstrap
    m = np.stack([np.arange(1, 9), np.arange(1, 9) * 2])
    np.testing.assert_allclose(iqm(m, axis=-1), [4.5, 9.0])
    with pytest.raises(ValueError):
        iqm([])


def test_iqm_gives_scipys_trimmed_mean_bit_for_bit():
    """The published IQMs and their intervals were computed with scipy.stats.trim_mean(x, 0.25): the same
    floats, for single arrays and for bootstrap matrices along either axis, with ties and odd sizes."""
    from scipy import stats

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 8, 101, 1000):
        x = rng.normal(size=n) * 10
        for values in (x, np.round(x)):
            assert iqm(values) == float(stats.trim_mean(values, 0.25))
        m = rng.normal(size=(300, n))
        for axis in (0, -1):
            assert np.array_equal(iqm(m, axis=axis), stats.trim_mean(m, 0.25, axis=axis))


def test_bootstrap_ci_contains_mean_and_shrinks():
    rng = np.random.default_rng(1)
    small = rng.normal(size=20)
    large = rng.normal(size=2000)
    lo_s, hi_s = bootstrap_ci(small, np.mean, n_boot=1000, seed=0)
    lo_l, hi_l = bootstrap_ci(large, np.mean, n_boot=1000, seed=0)
    assert lo_s <= small.mean() <= hi_s
    assert lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3  # width ~ 1/sqrt(n): ratio ~10


def test_bootstrap_ci_deterministic_and_seed_dependent():
    x = np.random.default_rng(2).normal(size=50)
    a = bootstrap_ci(x, iqm, n_boot=500, seed=7)
    b = bootstrap_ci(x, iqm, n_boot=500, seed=7)
    c = bootstrap_ci(x, iqm, n_boot=500, seed=8)
    assert a == b
    assert a != c


def test_bootstrap_ci_statistic_without_axis_matches_vectorised():
    x = np.random.default_rng(3).normal(size=30)
    fast = bootstrap_ci(x, np.median, n_boot=300, seed=0)
    slow = bootstrap_ci(x, lambda v: float(np.median(v)), n_boot=300, seed=0)
    assert fast == pytest.approx(slow)


def test_stratified_bootstrap_keeps_stratum_sizes():
    scores = np.array([0.0] * 3 + [10.0] * 7)
    strata = np.array(["a"] * 3 + ["b"] * 7)
    # every replicate has exactly 3 zeros and 7 tens -> mean exactly 7
    assert bootstrap_ci(scores, np.mean, n_boot=500, seed=0, strata=strata) == (7.0, 7.0)
    # interleaved labels work the same way
    perm = np.random.default_rng(0).permutation(10)
    assert bootstrap_ci(scores[perm], np.mean, n_boot=500, seed=0, strata=strata[perm]) == (7.0, 7.0)
    # the unstratified bootstrap does vary
    lo, hi = bootstrap_ci(scores, np.mean, n_boot=500, seed=0)
    assert lo < 7.0 < hi
    with pytest.raises(ValueError):
        bootstrap_ci(scores, np.mean, strata=strata[:5])


def test_bootstrap_ci_single_score_collapses():
    assert bootstrap_ci([3.5], np.mean) == (3.5, 3.5)


def test_team_return_is_mean_over_agents():
    rec = EpisodeRecord(seed=0, length=5, agent_returns={"a": 1.0, "b": 2.0, "c": 6.0})
    assert rec.team_return == pytest.approx(3.0)


def test_record_dict_round_trip_casts_numpy():
    rec = EpisodeRecord(seed=4, length=9, agent_returns={"a": np.float32(1.5), "b": np.float64(-2.0)})
    row = record_to_dict(rec)
    json.dumps(row)  # np.float32 would fail without the cast
    assert row["team_return"] == pytest.approx(-0.25)
    back = record_from_dict(row)
    assert back == EpisodeRecord(seed=4, length=9, agent_returns={"a": 1.5, "b": -2.0})


def test_summarize_keys_and_values():
    recs = _records(40)
    s = summarize(recs, n_boot=200, seed=0)
    json.dumps(s)
    assert s["n_episodes"] == 40
    assert set(s["agents"]) == {"agent_0", "agent_1"}
    for block in [s["team"], *s["agents"].values()]:
        assert set(block) == {"mean", "iqm", "std", "min", "max", "mean_ci", "iqm_ci", "n"}
        assert block["n"] == 40
        assert block["min"] <= block["mean"] <= block["max"]
        assert block["mean_ci"][0] <= block["mean"] <= block["mean_ci"][1]
        assert block["iqm_ci"][0] <= block["iqm_ci"][1]
    team = np.array([r.team_return for r in recs])
    assert s["team"]["mean"] == pytest.approx(team.mean())
    assert s["team"]["std"] == pytest.approx(team.std(ddof=1))
    assert s["agents"]["agent_1"]["mean"] == pytest.approx(
        np.mean([r.agent_returns["agent_1"] for r in recs])
    )
    assert s["episode_length"]["mean"] == pytest.approx(np.mean([r.length for r in recs]))
    # stratified variant runs and is deterministic
    strata = np.repeat([0, 1, 2, 3], 10)
    assert summarize(recs, n_boot=100, seed=1, strata=strata) == summarize(
        recs, n_boot=100, seed=1, strata=strata
    )


def test_summarize_single_episode():
    rec = EpisodeRecord(seed=0, length=7, agent_returns={"a": 1.0, "b": 3.0})
    s = summarize([rec])
    assert s["n_episodes"] == 1
    assert s["team"]["mean"] == s["team"]["iqm"] == 2.0
    assert s["team"]["mean_ci"] == [2.0, 2.0]
    assert s["team"]["iqm_ci"] == [2.0, 2.0]
    assert s["team"]["std"] == 0.0
    assert s["agents"]["b"]["mean_ci"] == [3.0, 3.0]
    assert s["episode_length"] == {"mean": 7.0, "std": 0.0, "min": 7, "max": 7}
    with pytest.raises(ValueError):
        summarize([])


def test_summarize_agent_missing_in_some_episodes():
    recs = [
        EpisodeRecord(seed=0, length=3, agent_returns={"a": 1.0, "b": 2.0}),
        EpisodeRecord(seed=1, length=3, agent_returns={"a": 3.0}),
    ]
    s = summarize(recs, n_boot=50, strata=[0, 1])
    assert s["agents"]["a"]["n"] == 2
    assert s["agents"]["b"]["n"] == 1


def test_summarize_gives_every_score_the_intervals_of_its_own_bootstrap():
    """The scores of one summary share resample indices where their episodes and strata agree: every interval
    is the one bootstrap_ci draws for that score alone (agents present in some episodes, strata, teams)."""
    recs = _records(40, agents=("a_0", "a_1", "b_0"))
    for i in range(0, 40, 3):
        del recs[i].agent_returns["b_0"]
    strata = np.arange(40) % 2
    teams = {"a": ["a_0", "a_1"], "b": ["b_0"]}
    s = summarize(recs, n_boot=300, seed=5, strata=strata, teams=teams)
    scores = {"team": (s["team"], [r.team_return for r in recs], strata),
              "teams/b": (s["teams"]["b"], [r.agent_returns["b_0"] for r in recs if "b_0" in r.agent_returns],
                          [k for k, r in zip(strata, recs) if "b_0" in r.agent_returns])}
    for a in ("a_0", "a_1", "b_0"):
        kept = [(r.agent_returns[a], k) for r, k in zip(recs, strata) if a in r.agent_returns]
        scores[a] = (s["agents"][a], [v for v, _ in kept], [k for _, k in kept])
    for summary, values, labels in scores.values():
        for key, statistic in (("mean_ci", np.mean), ("iqm_ci", iqm)):
            assert summary[key] == list(bootstrap_ci(values, statistic, n_boot=300, seed=5, strata=labels))


# ---------------------------------------------------------------- report


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "out.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert sorted(os.listdir(p.parent)) == ["out.txt"]


def test_write_json_round_trip(tmp_path):
    recs = _records(5)
    s = summarize(recs, n_boot=50)
    meta = {"policy": "mappo", "env_id": "mpe2/simple_spread_v3", "attack": None}
    path = write_json(tmp_path / "eval.json", s, recs, meta)
    meta2, s2, recs2 = read_json(path)
    assert meta2 == meta
    assert s2 == s
    assert recs2 == recs
    raw = json.loads(path.read_text())
    assert raw["episodes"][0]["team_return"] == pytest.approx(recs[0].team_return)


def test_marl_eval_format_and_merge(tmp_path):
    path = tmp_path / "marl_eval.json"
    recs_a = _records(4, seed=0)
    recs_b = _records(4, seed=1)
    write_marl_eval_json(path, recs_a, "mpe", "simple_spread", "mappo", "seed_0")
    write_marl_eval_json(path, recs_b, "mpe", "simple_spread", "mappo", "seed_1")
    write_marl_eval_json(path, recs_b, "mpe", "simple_spread", "distilled", "seed_0", step=1, step_count=1000)
    data = json.loads(path.read_text())
    algos = data["mpe"]["simple_spread"]
    assert set(algos["mappo"]) == {"seed_0", "seed_1"}
    run0 = algos["mappo"]["seed_0"]
    assert set(run0) == {"step_0", "absolute_metrics"}
    assert run0["step_0"]["step_count"] == 0
    assert run0["step_0"]["episode_return"] == pytest.approx([r.team_return for r in recs_a])
    assert run0["step_0"]["agent_1_return"] == pytest.approx([r.agent_returns["agent_1"] for r in recs_a])
    assert run0["absolute_metrics"]["episode_return"] == run0["step_0"]["episode_return"]
    assert algos["mappo"]["seed_1"]["step_0"]["episode_return"] == pytest.approx(
        [r.team_return for r in recs_b]
    )
    assert algos["distilled"]["seed_0"]["step_1"]["step_count"] == 1000
    # re-writing a step replaces it (idempotent), an earlier step does not overwrite absolute_metrics
    write_marl_eval_json(path, recs_a, "mpe", "simple_spread", "distilled", "seed_0", step=0)
    run = json.loads(path.read_text())["mpe"]["simple_spread"]["distilled"]["seed_0"]
    assert list(run) == ["step_1", "step_0", "absolute_metrics"]
    assert run["absolute_metrics"]["episode_return"] == pytest.approx([r.team_return for r in recs_b])
    # a file that is not JSON is a user-fixable error
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(MadistillError):
        write_marl_eval_json(bad, recs_a, "mpe", "t", "a", "r")


def test_markdown_table_one_row_per_key(tmp_path):
    summaries = {
        "teacher": summarize(_records(6, seed=0), n_boot=50),
        "student | distilled": summarize(_records(6, seed=1), n_boot=50),
        "student+attack": summarize(_records(6, seed=2, agents=("agent_0", "agent_2")), n_boot=50),
    }
    text = markdown_table(summaries)
    lines = text.strip().splitlines()
    assert len(lines) == 2 + len(summaries)
    assert "Team IQM [95% CI]" in lines[0]
    assert "agent_2 mean" in lines[0]
    assert lines[2].startswith("| teacher |")
    assert "student \\| distilled" in lines[3]
    t = summaries["teacher"]["team"]
    assert f"{t['iqm']:.2f} [{t['iqm_ci'][0]:.2f}, {t['iqm_ci'][1]:.2f}]" in lines[2]
    assert "–" in lines[2]  # teacher has no agent_2
    # all rows have the same number of cells
    assert {len(re.split(r"(?<!\\)\|", line)) for line in lines} == {len(lines[0].split("|"))}
    p = write_markdown(tmp_path / "table.md", text)
    assert p.read_text() == text


def test_the_evaluation_attack_and_cascade_modules_import_neither_matplotlib_nor_scipy():
    """Matplotlib is imported by the first figure drawn and SciPy by no evaluation: a stage with
    logger.figures=false starts without either (each is a large part of a short stage's start-up)."""
    import subprocess
    import sys

    modules = ("madistill.tb", "madistill.stages.evaluate", "madistill.evaluate.stats", "madistill.stages.figures",
               "madistill.attacks.robustness", "madistill.cascade.report", "madistill.cascade.monitor")
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(sorted(m for m in ('matplotlib', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"
