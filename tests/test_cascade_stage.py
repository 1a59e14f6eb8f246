"""`madistill cascade`: the report a saved relay teacher gets, and bad input as one line, exit 2, nothing left; online
alerts in evaluate and cascade; the configured fault in attack, saliency and explain."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import call_cli, compose_config, tiny

from envs.relay import RelayEnv

CHAIN = ["env=relay", "env.kwargs.max_cycles=12"]
STUDY = ["cascade.episodes=6", "cascade.n_boot=100", "cascade.replay_episodes=2", "cascade.lags=4",
         "cascade.onsets=[2,5]"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("cascade") / "teacher"
    with pytest.MonkeyPatch.context() as mp:
        assert call_cli(["train", *tiny(*CHAIN, "teacher.total_agent_steps=3000"), f"hydra.run.dir={run}"], mp) == 0
    return run


def test_cascade_report_has_the_required_keys_and_null_lags_where_nothing_can_reach(cli, teacher, tmp_path):
    out = tmp_path / "study"
    rc, stdout, err = cli("cascade", *tiny(*STUDY, "logger.figures=true", f"cascade.policy={teacher}",
                                          "fault=stuck", "fault.victims=[agent_1]", "fault.onset=3"),
                          f"hydra.run.dir={out}")
    assert rc == 0, err
    report = json.loads((out / "reports" / "cascade.json").read_text())
    agents = [f"agent_{i}" for i in range(4)]
    assert report["agents"] == agents
    truth = RelayEnv(n_agents=4, topology="chain").influence_lags()
    for s in agents:
        assert set(report["first_lag"][s]) == set(report["influence"][s]) == set(agents) - {s}
        for d in set(agents) - {s}:
            assert len(report["influence"][s][d]) == 4
            if (s, d) not in truth:  # upstream of the impulse: the effect is exactly 0 whatever the policy
                assert report["first_lag"][s][d] is None and report["influence"][s][d] == [0.0] * 4
            elif report["first_lag"][s][d] is not None:
                assert report["first_lag"][s][d] >= truth[(s, d)]  # never before the shortest path
    assert all(lag == 1 and (s, d) in truth for s, d, lag in report["edges"])
    cascade = report["faults"]["stuck@agent_1"]["cascade"]
    assert set(cascade["agents"]) == {"agent_0", "agent_2", "agent_3"}
    assert cascade["agents"]["agent_0"]["fail_rate"] == 0.0  # upstream of the victim
    figures = {p.name for p in (out / "reports").glob("*.png")}
    assert figures == {"cascade_teacher_influence.png", "cascade_teacher_graph.png",
                       "cascade_teacher_timeline_stuck@agent_1.png"}
    assert "cascade size" in stdout and (out / "reports" / "cascade.md").read_text().startswith("# Cascade study")
    assert report["threshold"] == 0.1 and "failure threshold" not in stdout  # above the noise floor: not raised


def test_the_terminal_says_when_the_noise_floor_raised_the_failure_threshold(cli, teacher, tmp_path):
    """Sampled twins differ by sampling alone: a failure must exceed that floor, and a cascade size of 0 may be
    its doing, so the terminal says so next to the sizes."""
    rc, said, err = cli("cascade", *tiny(*STUDY, f"cascade.policy={teacher}", "fault=stuck", "fault.victims=[agent_1]",
                                         "cascade.threshold=0.001"), f"hydra.run.dir={tmp_path / 'study'}")
    assert rc == 0, err
    report = json.loads((tmp_path / "study" / "reports" / "cascade.json").read_text())
    assert report["threshold"] == report["noise_floor"] > 0.001
    assert (f"  teacher  failure threshold TV > {report['threshold']:.3g}: cascade.threshold=0.001 raised to the "
            "sampling noise floor of clean twins") in said


@pytest.mark.parametrize(("args", "message"), [
    (["fault.victims=[agent_9]"], "fault.victims names ['agent_9']"),
    (["fault.name=melt"], "unknown fault 'melt'"),
    (["cascade.impulse=melt"], "cascade.impulse='melt' is no fault in conf/fault/"),
    (["cascade.impulse=noise"], "cascade.impulse='noise' changes no action in a one-step impulse; influence is measured from action impulses: use one of random, constant, dead, worst"),
    (["cascade.impulse=stuck"], "cascade.impulse='stuck' changes no action in a one-step impulse"),
    (["fault.onset=12"], "onsets past the episode's end, fault.onset (latest 12): episodes of 'relay' last 12 steps"),
    (["cascade.onsets=[3,20]"], "onsets past the episode's end, cascade.onsets=[3, 20]: episodes"),
    (["fault.onset=12", "cascade.onsets=[3,20]"],  # both in one line, so one fix does
     "onsets past the episode's end, fault.onset (latest 12) and cascade.onsets=[3, 20]: episodes"),
    (["fault=constant", "fault.action=[0.5,0.5]"], "has Discrete actions: set fault.action=[k]"),
    ([*CHAIN, "env.target=cascade_helpers.UnseededRelay"], "is not reproducible from its seed"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(cli, teacher, tmp_path, args, message):
    out = tmp_path / "study"
    rc, _, err = cli("cascade", *tiny(*STUDY, f"cascade.policy={teacher}", *args), f"hydra.run.dir={out}")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("madistill cascade: error: ") and message in lines[0], lines[0]
    assert not out.exists()


def test_several_policies_are_compared_on_the_same_faults_and_episodes(cli, teacher, tmp_path):
    other = teacher.parent / "teacher_s1"
    rc, _, err = cli("train", *tiny(*CHAIN, "teacher.total_agent_steps=3000", "seed=1"), f"hydra.run.dir={other}")
    assert rc == 0, err
    out = tmp_path / "study"
    rc, _, err = cli("cascade", *tiny(*STUDY, f"cascade.policy={teacher.parent}", "fault=dead",
                                     "fault.victims=[agent_0]", "fault.duration=null"), f"hydra.run.dir={out}")
    assert rc == 0, err
    report = json.loads((out / "reports" / "cascade.json").read_text())
    assert list(report["policies"]) == ["teacher@teacher", "teacher@teacher_s1"]
    assert report["meta"]["policy"] == "teacher@teacher" and report["first_lag"] == report["policies"]["teacher@teacher"]["first_lag"]
    for r in report["policies"].values():
        c = r["faults"]["dead@agent_0"]["cascade"]
        lo, hi = c["others_return_delta_ci"]
        assert lo <= c["others_return_delta"] <= hi and c["size_ci"][0] <= c["size_mean"] <= c["size_ci"][1]
    md = (out / "reports" / "cascade.md").read_text()
    assert "(clean and faulted twins of each seed, the same sampling streams)" in md
    assert "## Comparison" in md and md.count("| dead@agent_0 | teacher@") == 2
    # run directories listed: named by their directories' names, or by their paths where the names are the same
    from madistill.stages.policies import policy_labels, studied_policies

    cfg = compose_config(tiny(*CHAIN))
    refs = studied_policies(cfg, [str(teacher), str(other)], "missing")[1]
    assert policy_labels(refs) == [f"teacher@{teacher.name}", f"teacher@{other.name}"]
    twin = tmp_path / "elsewhere" / teacher.name
    shutil.copytree(teacher, twin)
    refs = studied_policies(cfg, [str(teacher), str(twin)], "missing")[1]
    assert policy_labels(refs) == [f"teacher@{teacher}", f"teacher@{twin}"]


def test_a_student_is_compared_with_its_teacher_episode_by_episode(cli, teacher, tmp_path):
    """Policies of one run (links: the teacher and another policy named student) get, per fault, the paired
    difference student - teacher of cascade size and return delta over the same episodes."""
    other = teacher.parent / "teacher_s2"
    rc, _, err = cli("train", *tiny(*CHAIN, "teacher.total_agent_steps=3000", "seed=2"), f"hydra.run.dir={other}")
    assert rc == 0, err
    pair = tmp_path / "pair" / "policies"
    pair.mkdir(parents=True)
    (pair / "teacher").symlink_to(teacher / "policies" / "teacher", target_is_directory=True)
    (pair / "student").symlink_to(other / "policies" / "teacher", target_is_directory=True)
    out = tmp_path / "study"
    rc, _, err = cli("cascade", *tiny(*STUDY, f"cascade.policy={pair.parent}", "fault=random", "fault.victims=[agent_0]",
                                     "fault.duration=null", "cascade.deterministic=true"), f"hydra.run.dir={out}")
    assert rc == 0, err
    report = json.loads((out / "reports" / "cascade.json").read_text())
    t, s = (report["policies"][p]["faults"]["random@agent_0"]["cascade"] for p in ("teacher", "student"))
    assert report["policies"]["student"]["seeds"] == report["seeds"] and len(report["seeds"]) == 6
    assert len(t["sizes"]) == 6 and np.mean(t["sizes"]) == t["size_mean"]
    assert np.mean(t["others_return_deltas"]) == pytest.approx(t["others_return_delta"])
    row = report["comparison"]["random@agent_0"]["student"]
    assert row["baseline"] == "teacher" and report["comparison"]["random@agent_0"]["teacher"]["baseline"] is None
    size = np.subtract(s["sizes"], t["sizes"])
    assert row["size_diff"]["mean"] == pytest.approx(size.mean()) and row["size_diff"]["n"] == 6
    assert row["size_diff"]["lo"] <= size.mean() <= row["size_diff"]["hi"]
    delta = np.subtract(s["others_return_deltas"], t["others_return_deltas"])
    assert row["others_return_delta_diff"]["mean"] == pytest.approx(delta.mean())
    assert (row["size"]["mean"], row["size"]["lo"], row["size"]["hi"]) == pytest.approx((s["size_mean"], *s["size_ci"]))
    md = (out / "reports" / "cascade.md").read_text()
    assert "(clean and faulted twins of each seed, greedy actions)" in md  # cascade.deterministic=true
    assert f"| random@agent_0 | student | {s['size_mean']:.2f} [" in md and "| teacher | " + f"{size.mean():+.2f} [" in md


def test_evaluate_plays_under_the_configured_fault(cli, teacher, tmp_path):
    """`madistill evaluate fault=... fault.victims=[...]`: the same episodes, the victim dead from step 0; the
    report says so. A fault named without victims is refused, since it would play nothing."""
    def team_mean(*args: str) -> tuple[float, str, dict]:
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        rc, _, err = cli("evaluate", *tiny(f"eval.policy={teacher}", "eval.random_baseline=false", *args),
                         f"hydra.run.dir={out}")
        assert rc == 0, err
        summary = json.loads((out / "reports" / "eval_teacher.json").read_text())
        marl_eval = json.loads((out / "reports" / "marl_eval.json").read_text())
        return summary["summary"]["team"]["mean"], (out / "reports" / "eval.md").read_text(), {
            "fault": summary["meta"]["fault"], "tasks": list(marl_eval["pettingzoo"])}

    clean, clean_md, clean_meta = team_mean()
    rc, _, err = cli("evaluate", *tiny(f"eval.policy={teacher}", "fault=dead"), f"hydra.run.dir={tmp_path / 'none'}")
    assert rc == 2 and "fault=dead names no victims, so no fault would be played" in err
    assert not (tmp_path / "none").exists()
    victims = "agent_0,agent_1,agent_2,agent_3"
    faulted, md, meta = team_mean("fault=dead", f"fault.victims=[{victims}]", "fault.onset=0")
    assert "Under fault" not in clean_md
    assert "Under fault 'dead' on agent_0, agent_1, agent_2, agent_3 from step 0 to the episode's end" in md
    assert faulted != clean
    # the results files record the fault, and marl-eval files it under a task of its own
    assert clean_meta == {"fault": None, "tasks": ["relay"]}
    assert meta["fault"]["name"] == "dead" and meta["fault"]["victims"] == victims.split(",")
    assert meta["tasks"] == [f"relay+dead@{victims.replace(',', '+')}"]


ALERTS = ["alerts.enabled=true", "alerts.calibration_episodes=15", "alerts.false_alarm_rate=0.5", "eval.episodes=6",
          "eval.random_baseline=false"]


def _first_victim_alert(events: list[dict], victims: list[str], onset: int, seeds: range) -> dict[int, int]:
    """Per episode seed, the first step at or after ``onset`` with an alert on a victim (absent: none)."""
    first: dict[int, int] = {}
    for e in events:
        if e["agent"] in victims and e["seed"] in seeds and e["step"] >= onset:
            first[e["seed"]] = min(first.get(e["seed"], e["step"]), e["step"])
    return first


def test_evaluate_with_alerts_writes_events_detection_and_false_alarms(cli, teacher, tmp_path):
    out = tmp_path / "eval"
    rc, said, err = cli("evaluate", *tiny(*ALERTS, f"eval.policy={teacher}", "fault=random", "fault.victims=[agent_0]",
                                          "fault.onset=3"), f"hydra.run.dir={out}")
    assert rc == 0, err
    # the terminal says what the episodes played under and where the alerts are
    assert "  Under fault 'random' on agent_0 from step 3" in said
    assert f"  alerts:      {out / 'reports' / 'alerts.json'}" in said
    report = json.loads((out / "reports" / "alerts.json").read_text())
    assert report["meta"]["episodes"] == 6 and report["meta"]["alerts"]["enabled"] is True
    section = report["policies"]["teacher"]
    agents = [f"agent_{i}" for i in range(4)]
    assert set(section["thresholds"]) == set(agents)
    assert all(set(t) == {"obs", "surprise"} for t in section["thresholds"].values())
    seeds = range(report["meta"]["seed"], report["meta"]["seed"] + 6)
    clean = section["clean"]
    for e in clean["events"]:
        assert set(e) == {"agent", "kind", "seed", "step", "score", "threshold"} and e["score"] > e["threshold"]
    assert clean["false_alarms"]["per_episode"]["mean"] == pytest.approx(len(clean["events"]) / 6)
    fault = section["faults"]["random@agent_0"]
    assert fault["victims"] == ["agent_0"]
    first = _first_victim_alert(fault["events"], ["agent_0"], 3, seeds)
    assert fault["detected"]["n"] == 6 and fault["detected"]["mean"] == pytest.approx(len(first) / 6)
    if first:
        assert fault["delay"]["mean"] == pytest.approx(sum(s - 3 for s in first.values()) / len(first))
    md = (out / "reports" / "eval.md").read_text()
    assert "## Online alerts" in md and "| teacher | random@agent_0 |" in md


@pytest.mark.parametrize("stage, key", [("evaluate", "eval.policy"), ("cascade", "cascade.policy")])
def test_an_alerts_reference_that_is_no_policy_is_refused_before_any_episode(cli, teacher, tmp_path, monkeypatch,
                                                                            stage, key):
    from madistill.evaluate import evaluator

    monkeypatch.setattr(evaluator, "run_episodes", lambda *a, **k: pytest.fail("episodes played before the check"))
    rc, _, err = cli(stage, *tiny(*ALERTS, f"{key}={teacher}", f"alerts.reference={tmp_path / 'none'}",
                                  "fault=random", "fault.victims=[agent_0]"), f"hydra.run.dir={tmp_path / 'out'}")
    assert rc == 2 and f"{tmp_path / 'none'}" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_evaluate_without_a_fault_watches_clean_episodes_only(cli, teacher, tmp_path):
    out = tmp_path / "eval"
    rc, _, err = cli("evaluate", *tiny(*ALERTS, f"eval.policy={teacher}"), f"hydra.run.dir={out}")
    assert rc == 0, err
    section = json.loads((out / "reports" / "alerts.json").read_text())["policies"]["teacher"]
    assert section["faults"] == {} and section["clean"]["false_alarms"]["any"]["n"] == 6
    assert "| teacher | none |" in (out / "reports" / "eval.md").read_text()


def test_alerts_are_off_by_default_and_too_few_calibration_episodes_are_refused(cli, teacher, tmp_path):
    out = tmp_path / "eval"
    rc, _, err = cli("evaluate", *tiny(f"eval.policy={teacher}", "eval.random_baseline=false"), f"hydra.run.dir={out}")
    assert rc == 0, err
    assert not (out / "reports" / "alerts.json").exists() and "Online alerts" not in (out / "reports" / "eval.md").read_text()
    bad = tmp_path / "bad"
    rc, _, err = cli("evaluate", *tiny(*ALERTS, f"eval.policy={teacher}", "alerts.calibration_episodes=3"),
                     f"hydra.run.dir={bad}")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "raise alerts.calibration_episodes" in lines[0], err
    assert not bad.exists()


def test_cascade_with_alerts_watches_each_studied_fault(cli, teacher, tmp_path):
    out = tmp_path / "study"
    rc, said, err = cli("cascade", *tiny(*STUDY, *ALERTS[:3], f"cascade.policy={teacher}", "fault=dead", "fault.onset=2"),
                        f"hydra.run.dir={out}")
    assert rc == 0, err
    assert f"  alerts:      {out / 'reports' / 'alerts.json'}" in said
    report = json.loads((out / "reports" / "alerts.json").read_text())
    seeds = range(report["meta"]["seed"], report["meta"]["seed"] + 6)
    faults = report["policies"]["teacher"]["faults"]
    assert list(faults) == [f"dead@agent_{i}" for i in range(4)]  # fault.victims empty: each agent in turn
    for label, f in faults.items():
        first = _first_victim_alert(f["events"], f["victims"], 2, seeds)
        assert f["detected"]["n"] == 6 and f["detected"]["mean"] == pytest.approx(len(first) / 6), label
    assert "## Online alerts" in (out / "reports" / "cascade.md").read_text()


DEAD_SOURCE = ["fault=dead", "fault.victims=[agent_0]", "fault.onset=0"]
ATTACK = ["attack=quick", "attack.methods=[random]", "attack.eps=[0.3]", "attack.victims=[agent_2]",
          "attack.episodes=4", "attack.seed=500"]


def test_attack_plays_its_clean_and_attacked_episodes_under_the_fault(cli, teacher, tmp_path):
    fault = ["fault=random", "fault.victims=[agent_0]", "fault.onset=2"]
    rc, _, err = cli("attack", *tiny(*ATTACK, f"attack.policy={teacher}", *fault), f"hydra.run.dir={tmp_path / 'f'}")
    assert rc == 0, err
    faulted = json.loads((tmp_path / "f" / "reports" / "robustness.json").read_text())
    assert faulted["meta"]["fault"]["name"] == "random" and faulted["meta"]["fault"]["victims"] == ["agent_0"]
    assert "Under fault 'random' on agent_0" in (tmp_path / "f" / "reports" / "robustness.md").read_text()
    rc, _, err = cli("attack", *tiny(*ATTACK, f"attack.policy={teacher}"), f"hydra.run.dir={tmp_path / 'c'}")
    assert rc == 0, err
    clean = json.loads((tmp_path / "c" / "reports" / "robustness.json").read_text())
    assert clean["meta"]["fault"] is None
    # the same episodes evaluated under the same fault give the faulted clean return exactly
    rc, _, err = cli("evaluate", *tiny(f"eval.policy={teacher}", "eval.episodes=4", "eval.seed=500",
                                       "eval.random_baseline=false", *fault), f"hydra.run.dir={tmp_path / 'e'}")
    assert rc == 0, err
    evaluated = json.loads((tmp_path / "e" / "reports" / "eval_teacher.json").read_text())["summary"]
    f_clean, c_clean = faulted["results"]["teacher"]["clean"], clean["results"]["teacher"]["clean"]
    assert f_clean == pytest.approx(evaluated["team"]["mean"]) and f_clean != pytest.approx(c_clean)


def _source_symbols_heard(run, stage: str) -> np.ndarray:
    """Per step, the symbol agent_1 hears from agent_0 in the stage's saved observations (-1: none yet)."""
    obs = np.load(run / "reports" / f"{stage}.npz")["obs/agent"].reshape(-1, 4, 3)[:, 1]
    return np.where(obs.any(-1), obs.argmax(-1), -1)


@pytest.mark.parametrize("stage", ["saliency", "explain"])
def test_saliency_and_explain_collect_their_observations_under_the_fault(cli, teacher, tmp_path, stage):
    args = [f"{stage}.policy={teacher}", f"{stage}.episodes=2"] + (["explain.methods=[gradient]"] if stage == "explain" else [])
    rc, _, err = cli(stage, *tiny(*args, *DEAD_SOURCE), f"hydra.run.dir={tmp_path / 'f'}")
    assert rc == 0, err
    rc, _, err = cli(stage, *tiny(*args), f"hydra.run.dir={tmp_path / 'c'}")
    assert rc == 0, err
    heard_faulted, heard_clean = _source_symbols_heard(tmp_path / "f", stage), _source_symbols_heard(tmp_path / "c", stage)
    assert set(heard_faulted.tolist()) == {-1, 0}  # the dead source only ever sends symbol 0
    assert set(heard_clean.tolist()) - {-1, 0}  # a live source sends others
