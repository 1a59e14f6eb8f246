"""Teams (sides) in competitive and mixed envs: inferred or configured, per-team returns in every report,
retention and robustness per team, victims by team; a cooperative env keeps its one-team reports."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mpe2 import simple_adversary_v3, simple_spread_v3, simple_tag_v3, simple_world_comm_v3

from envs import duel
from madistill.attacks.budget import Budget
from madistill.attacks.learned import AdversaryEnv
from madistill.attacks.robustness import RobustnessResult, _return_flags, markdown_report
from madistill.attacks.transform import victim_sets
from madistill.envs import EnvSpec, MultiAgentVecEnv, group_agents, make_env
from madistill.envs.episodes import EpisodeRecord
from madistill.envs.teams import resolve_teams
from madistill.errors import MadistillError
from madistill.evaluate.evaluator import run_episodes, uniform_team
from madistill.evaluate.report import markdown_table
from madistill.evaluate.stats import summarize
from madistill.normalize import ObsNormalizer
from madistill.policies import MLPPolicy, TeamPolicy
from madistill.stages.results import retentions

DUEL = ("adversary_0", "adversary_1", "agent_0", "agent_1")


def _agents(module) -> list[str]:
    return list(module.parallel_env().possible_agents)


def test_teams_are_inferred_from_pettingzoos_mpe_names():
    assert resolve_teams(None, _agents(simple_adversary_v3)) == {
        "adversaries": ("adversary_0",), "good": ("agent_0", "agent_1")}
    assert resolve_teams({}, _agents(simple_tag_v3)) == {
        "adversaries": ("adversary_0", "adversary_1", "adversary_2"), "good": ("agent_0",)}
    assert resolve_teams(None, _agents(simple_world_comm_v3)) == {
        "adversaries": ("leadadversary_0", "adversary_0", "adversary_1", "adversary_2"), "good": ("agent_0", "agent_1")}
    # names that show no sides: one team of every agent (speaker and listener cooperate)
    assert resolve_teams(None, _agents(simple_spread_v3)) == {"team": ("agent_0", "agent_1", "agent_2")}
    assert resolve_teams(None, ["speaker_0", "listener_0"]) == {"team": ("speaker_0", "listener_0")}


def test_teams_from_config_take_ids_and_prefixes_and_refuse_what_does_not_partition_the_agents():
    agents = _agents(simple_world_comm_v3)
    assert resolve_teams({"red": ["lead", "adversary_0"], "blue": ["adversary_1", "adversary_2", "agent"]}, agents) == {
        "red": ("leadadversary_0", "adversary_0"), "blue": ("adversary_1", "adversary_2", "agent_0", "agent_1")}
    assert resolve_teams({"eve": "eve", "pair": ["alice_0", "bob_0"]}, ["eve_0", "bob_0", "alice_0"]) == {
        "eve": ("eve_0",), "pair": ("bob_0", "alice_0")}
    with pytest.raises(MadistillError, match=r"env.teams.blue names 'ghost'.*\['leadadversary_0', 'adversary_0'"):
        resolve_teams({"red": ["lead", "adversary"], "blue": ["ghost"]}, agents)
    with pytest.raises(MadistillError, match=r"'adversary_0' is in env.teams.red and env.teams.blue"):
        resolve_teams({"red": ["adversary"], "blue": ["adversary_0", "agent", "lead"]}, agents)
    with pytest.raises(MadistillError, match=r"agents \['agent_0', 'agent_1'\] are in no team"):
        resolve_teams({"red": ["adversary", "lead"]}, agents)


def _duel_records(n: int = 8, seed: int = 0) -> list[EpisodeRecord]:
    """Zero-sum episodes: each adversary gets minus the good agents' return."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        g = float(rng.normal(1.0, 0.5))
        out.append(EpisodeRecord(k, 5, {"adversary_0": -g, "adversary_1": -g, "agent_0": g, "agent_1": g}))
    return out


def test_summary_and_table_give_each_teams_return_where_the_all_agent_mean_is_zero():
    recs = _duel_records()
    teams = resolve_teams(None, DUEL)
    s = summarize(recs, n_boot=100, seed=0, teams=teams)
    good = np.array([r.agent_returns["agent_0"] for r in recs])
    assert s["team"]["mean"] == pytest.approx(0.0)  # opposing sides cancel in the mean over all agents
    assert set(s["teams"]) == {"adversaries", "good"}
    assert s["teams"]["good"]["mean"] == pytest.approx(good.mean())
    assert s["teams"]["adversaries"]["mean"] == pytest.approx(-good.mean())
    assert s["teams"]["good"]["iqm_ci"][0] < good.mean() < s["teams"]["good"]["iqm_ci"][1]
    table = markdown_table({"teacher": s})
    header, _, row = table.splitlines()
    assert "Team IQM" not in header and "adversaries IQM [95% CI]" in header and "good mean [95% CI]" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{-good.mean():.2f} [{s['teams']['adversaries']['mean_ci'][0]:.2f}, " \
                       f"{s['teams']['adversaries']['mean_ci'][1]:.2f}]"


def test_a_cooperative_env_keeps_its_one_team_summary_and_table():
    recs = [EpisodeRecord(k, 3, {"agent_0": float(k), "agent_1": 2.0 * k}) for k in range(6)]
    one = resolve_teams(None, ["agent_0", "agent_1"])
    plain = summarize(recs, n_boot=100, seed=0)
    assert summarize(recs, n_boot=100, seed=0, teams=one) == plain
    assert "teams" not in plain
    assert markdown_table({"p": plain}).splitlines()[0].startswith("| Policy | Team IQM [95% CI] | Team mean [95% CI] |")


def _summary(good: float, adv: float, team: float) -> dict:
    return {"team": {"mean": team}, "teams": {"good": {"mean": good}, "adversaries": {"mean": adv}}}


def test_retention_is_per_team_never_of_the_mean_over_opposing_sides():
    summaries = {"teacher": _summary(4.0, -4.0, 0.0), "student": _summary(2.5, -2.5, 0.0),
                 "random": _summary(1.0, -1.0, 0.0)}
    kept = retentions(summaries)
    assert set(kept) == {"good", "adversaries"}
    assert kept["good"] == pytest.approx(0.5)  # (2.5 - 1) / (4 - 1)
    assert np.isnan(kept["adversaries"])  # the teacher's adversaries do worse than random ones
    one = {n: {"team": {"mean": m}} for n, m in (("teacher", 4.0), ("student", 2.5), ("random", 1.0))}
    assert retentions(one) == {None: pytest.approx(0.5)}


def test_victims_by_team():
    teams = resolve_teams(None, DUEL)
    assert victim_sets(["team:adversaries", "team:good+adversary_0", "all"], DUEL, teams) == {
        "team:adversaries": ["adversary_0", "adversary_1"],
        "team:good+adversary_0": ["agent_0", "agent_1", "adversary_0"],
        "all": list(DUEL)}
    with pytest.raises(MadistillError, match=r"'team:red', but the env's teams are \['adversaries', 'good'\]"):
        victim_sets(["team:red"], DUEL, teams)
    with pytest.raises(MadistillError, match=r"names \['ghost'\]: use all, each, team:<name>"):
        victim_sets(["ghost+agent_0"], DUEL, teams)


def test_robustness_gives_the_worst_case_per_team():
    teams = resolve_teams(None, DUEL)
    res = RobustnessResult(0.0, 0.0, {a: 0.0 for a in DUEL}, teams=teams,
                           team_clean={"adversaries": -2.0, "good": 2.0}, team_random={"adversaries": 0.0, "good": 0.0})
    # fgsm hurts the good team most, pgd the adversaries: the all-agent mean (0) shows neither
    res.episodes = {"all": {"fgsm": {0.5: np.zeros(2)}, "pgd": {0.5: np.zeros(2)}}}
    res.team_episodes = {"good": {"all": {"fgsm": {0.5: np.array([0.5, 1.5])}, "pgd": {0.5: np.array([3.0, 3.0])}}},
                         "adversaries": {"all": {"fgsm": {0.5: np.array([-0.5, -1.5])}, "pgd": {0.5: np.array([-3.0, -3.0])}}}}
    res.agent_returns = {"all": {m: {0.5: {a: (-x if a.startswith("adv") else x) for a in DUEL}}
                                 for m, x in (("fgsm", 1.0), ("pgd", 3.0))}}
    assert res.worst("all", 0.5, "good") == ("fgsm", 1.0)
    assert res.worst("all", 0.5, "adversaries") == ("pgd", -3.0)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["teams"]["good"]["worst_case"]["all"]["0.5"] == ["fgsm", 1.0]
    assert d["teams"]["adversaries"]["worst_case"]["all"]["0.5"] == ["pgd", -3.0]
    assert d["teams"]["good"]["clean"] == 2.0 and d["teams"]["adversaries"]["agents"] == ["adversary_0", "adversary_1"]
    report = markdown_report({"teacher": res}, "duel", 2)
    assert "### team good: clean 2.00, random policy 0.00" in report
    assert report.count("| **worst case** | 1.00 [0.50, 1.50] (fgsm) |") == 1
    assert report.count("| **worst case** | -3.00 [-3.00, -3.00] (pgd) |") == 1
    assert "| all | 0.5 | good | fgsm | -1.00 | -1.00 | 1.00 | 1.00 |" in report
    # masking checks read each attacked team's return: PGD leaves the good team far more than FGSM does
    ac = SimpleNamespace(masking_tolerance=0.1, objective_tolerance=0.1, n_boot=200, collapse_eps=None)
    clean = [EpisodeRecord(seed=i, length=5, agent_returns={a: (-2.0 if a.startswith("adv") else 2.0) for a in DUEL})
             for i in range(2)]
    flags = _return_flags(res, "all", ["agent_0"], ac, clean)
    assert [(f.name, f.detail.split(":")[0]) for f in flags] == [("pgd_weaker_than_fgsm", "team good")]
    # victims on both teams: an attack lowers one team's return and raises the other's, nothing to check
    assert _return_flags(res, "all", DUEL, ac, clean) == [] and "victims all: they play on several teams" in res.skipped[-1]
    # the adversaries' teacher is worse than random: no gain to lose
    assert _return_flags(res, "all", ["adversary_0"], ac, clean) == [] and "no better than random" in res.skipped[-1]


def test_duel_env_has_opposite_team_returns():
    with MultiAgentVecEnv(EnvSpec("envs.duel.parallel_env", {"n": 2, "max_cycles": 5}, name="duel"), 2,
                          num_workers=0) as venv:
        assert tuple(venv.possible_agents) == DUEL
        recs = run_episodes(venv, uniform_team(venv), 6, 0, False)
    for r in recs:
        assert r.agent_returns["agent_0"] == r.agent_returns["agent_1"] == -r.agent_returns["adversary_0"]
        assert r.team_return == 0.0
    assert any(r.agent_returns["agent_0"] != 0 for r in recs)
    assert duel.parallel_env().metadata["name"] == "duel_v0"


@pytest.mark.slow
def test_pipeline_and_attack_on_a_two_team_env_report_each_team(cli, tmp_path):
    from conftest import tiny

    run = tmp_path / "run"
    rc, out, err = cli("pipeline", *tiny("env=duel", "teacher.total_agent_steps=2000"), f"hydra.run.dir={run}")
    assert rc == 0, err
    reports = run / "reports"
    ev = json.loads((reports / "eval_teacher.json").read_text())
    assert ev["meta"]["teams"] == {"adversaries": ["adversary_0", "adversary_1"], "good": ["agent_0", "agent_1"]}
    good = [e["agent_returns"]["agent_0"] for e in ev["episodes"]]
    assert ev["summary"]["teams"]["good"]["mean"] == pytest.approx(np.mean(good))
    assert ev["summary"]["teams"]["adversaries"]["mean"] == pytest.approx(-np.mean(good))
    assert ev["summary"]["team"]["mean"] == pytest.approx(0.0)
    md = (reports / "eval.md").read_text()
    assert "**adversaries**: adversary_0, adversary_1; **good**: agent_0, agent_1" in md
    assert "| Policy | adversaries IQM [95% CI] | adversaries mean [95% CI] | good IQM [95% CI] |" in md
    marl = json.loads((reports / "marl_eval.json").read_text())
    (teacher_run,) = marl["pettingzoo"]["duel"]["teacher"].values()
    assert teacher_run["absolute_metrics"]["good_team_return"] == pytest.approx(good)
    summaries = {n: json.loads((reports / f"eval_{n}.json").read_text())["summary"] for n in ("teacher", "student", "random")}
    for team in ("adversaries", "good"):
        assert f"teacher    team {team} return IQM" in out
        kept = retentions(summaries)[team]
        assert (f"keeps {100 * kept:.1f}% of the teacher's gain over random (return means of team {team})" in out
                if kept == kept else f"retention of {team}: n/a" in out)
    assert "team-return means" not in out  # no retention of the mean over opposing sides
    # training curves per team: zero-sum, so the two sides' curves mirror each other
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    curves = {t: [e.value for e in ea.Scalars(f"charts/team_return/{t}")] for t in ("adversaries", "good")}
    assert len(curves["good"]) > 0 and curves["adversaries"] == pytest.approx([-v for v in curves["good"]])

    rc, out, err = cli("attack", *tiny(f"attack.policy={run}", "attack.episodes=4", "attack.eps=[0.5]",
                                       "attack.methods=[random,fgsm]", "attack.checks=false",
                                       "attack.victims=[all,team:adversaries]"), f"hydra.run.dir={tmp_path / 'a'}")
    assert rc == 0, err
    res = json.loads((tmp_path / "a" / "reports" / "robustness.json").read_text())["results"]["teacher"]
    assert set(res["returns"]) == {"all", "team:adversaries"}
    for team in ("adversaries", "good"):
        cells = res["teams"][team]["returns"]["team:adversaries"]
        attack, value = res["teams"][team]["worst_case"]["team:adversaries"]["0.5"]
        assert value == min(r["0.5"] for r in cells.values()) == cells[attack]["0.5"]
        assert f"teacher  team {team} clean" in out
    report = (tmp_path / "a" / "reports" / "robustness.md").read_text()
    assert "### team adversaries: clean" in report and "victims: **team:adversaries**" in report

    rc, out, err = cli("evaluate", f"eval.policy={run}", "+env.teams={red: [adversary], blue: [ghost]}",
                       f"hydra.run.dir={tmp_path / 'e'}")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "env.teams.blue names 'ghost'" in lines[0] and "'agent_1'" in lines[0]
    assert not (tmp_path / "e" / "reports").exists()


def test_search_attacks_lower_the_return_of_the_victims_team(monkeypatch):
    from madistill.attacks import robustness

    def fake_run(venv, team, episodes, seed, transforms=()):
        k = transforms[0].generator.initial_seed() - seed  # candidate index
        return [EpisodeRecord(seed + i, 5, {"adversary_0": -g, "agent_0": g})
                for i in range(episodes) for g in [float((i * 7 + k * 3) % 5)]]

    monkeypatch.setattr(robustness, "run_episodes", fake_run)
    budget = {"adversary": Budget.build(0.1, 1), "agent": Budget.build(0.1, 2)}
    recs = robustness.worst_offsets(None, None, ["agent_0"], budget, 3, 4, 100, target=("agent_0",))
    assert [r.agent_returns["agent_0"] for r in recs] == [min((i * 7 + k * 3) % 5 for k in range(3)) for i in range(4)]
    # the all-agent mean is 0 for every candidate, so without a target the first candidate is kept
    recs = robustness.worst_offsets(None, None, ["agent_0"], budget, 3, 4, 100)
    assert [r.agent_returns["agent_0"] for r in recs] == [(i * 7) % 5 for i in range(4)]

    # the learned adversary's reward is minus its target team's reward, not minus the (zero) all-agent mean
    spec = EnvSpec("envs.duel.parallel_env", {"n": 1, "max_cycles": 8}, name="duel")
    groups = group_agents(make_env(spec))
    policies = {g.name: MLPPolicy(g, {"hidden_sizes": [], "activation": "tanh"}) for g in groups}
    with torch.no_grad():  # good agents play the bit they see, the adversary always plays 0
        policies["agent"].net[0].weight.copy_(torch.eye(2))
        policies["agent"].net[0].bias.zero_()
        policies["adversary"].net[0].weight.zero_()
        policies["adversary"].net[0].bias.copy_(torch.tensor([1.0, 0.0]))
    team = TeamPolicy(groups, policies, {g.name: ObsNormalizer(g.obs_dim, enabled=False) for g in groups})

    def rewards(target):
        env = AdversaryEnv(spec, team, ["agent_0"], {"agent": Budget.build(0.01, 2)}, target=target)
        env.reset(seed=3)
        return [env.step(np.zeros(2, dtype=np.float32))[1] for _ in range(8)]

    good = rewards(("agent_0",))
    assert set(good) == {0.0, -1.0}  # minus the good agent's reward: 1 - [bit == 0]
    assert rewards(("adversary_0",)) == [-r for r in good]
    assert rewards(None) == [0.0] * 8


def test_teams_set_at_training_follow_the_policies_unless_the_command_line_sets_them(cli, tmp_path):
    from conftest import tiny

    mixed = "+env.teams={left: [adversary_0, agent_0], right: [adversary_1, agent_1]}"
    rc, _, err = cli("train", *tiny("env=duel", "teacher.total_agent_steps=400", mixed), f"hydra.run.dir={tmp_path / 't'}")
    assert rc == 0, err

    def teams_of(run: str, *extra: str) -> dict:
        rc, _, err = cli("evaluate", *tiny(f"eval.policy={tmp_path / 't'}", "eval.random_baseline=false", *extra),
                         f"hydra.run.dir={tmp_path / run}")
        assert rc == 0, err
        return json.loads((tmp_path / run / "reports" / "eval_teacher.json").read_text())["meta"]["teams"]

    assert teams_of("e1") == {"left": ["adversary_0", "agent_0"], "right": ["adversary_1", "agent_1"]}
    assert teams_of("e2", "+env.teams={a: [adversary], g: [agent]}") == {
        "a": ["adversary_0", "adversary_1"], "g": ["agent_0", "agent_1"]}
    # a student keeps the teams its teacher was trained with
    rc, _, err = cli("distill", *tiny(f"distill.teacher={tmp_path / 't'}", "distill.rounds=1"), f"hydra.run.dir={tmp_path / 's'}")
    assert rc == 0, err
    saved = json.loads((tmp_path / "s" / "policies" / "student" / "manifest.json").read_text())["config"]["env"]["teams"]
    assert saved == {"left": ["adversary_0", "agent_0"], "right": ["adversary_1", "agent_1"]}


def test_a_student_below_random_is_warned_about_only_on_sides_whose_teacher_beats_random():
    from madistill.stages.results import worse_than_random

    def summary(adversaries: float, good: float) -> dict:
        return {"team": {"mean": 0.0}, "teams": {"adversaries": {"mean": adversaries}, "good": {"mean": good}}}

    # zero-sum self-play: the trained adversaries lose to the trained good agents, so both the teacher's and the
    # student's adversaries are below random by the game; the good student lost what its teacher had
    summaries = {"teacher": summary(-2.7, 2.7), "student": summary(-2.7, -0.5), "random": summary(-0.2, 0.2)}
    (warning,) = worse_than_random(summaries)
    assert warning.startswith("warning: student's mean return for team good -0.50 is below the random team's 0.20")
    summaries["student"] = summary(-2.7, 2.7)
    assert worse_than_random(summaries) == []


def test_team_checks_compare_the_episodes_where_the_team_took_part():
    teams = resolve_teams(None, DUEL)
    res = RobustnessResult(0.0, 0.0, {a: 0.0 for a in DUEL}, teams=teams,
                           team_clean={"adversaries": -2.0, "good": 2.0}, team_random={"adversaries": 0.0, "good": 0.0})
    # the third episode had no good agent: its team return is NaN, which must not silence the checks
    res.team_episodes = {"good": {"all": {"fgsm": {0.5: np.array([0.5, 1.5, np.nan])},
                                          "pgd": {0.5: np.array([3.0, 3.0, np.nan])}}}}
    clean = [EpisodeRecord(i, 5, {a: (-2.0 if a.startswith("adv") else 2.0) for a in DUEL}) for i in range(2)]
    clean.append(EpisodeRecord(2, 5, {"adversary_0": -2.0, "adversary_1": -2.0}))
    ac = SimpleNamespace(masking_tolerance=0.1, objective_tolerance=0.1, n_boot=200, collapse_eps=None)
    flags = _return_flags(res, "all", ["agent_0"], ac, clean)
    assert [(f.name, f.detail.split(":")[0]) for f in flags] == [("pgd_weaker_than_fgsm", "team good")]


def test_teacher_training_averages_each_teams_return_once_per_iteration(make_cfg, tmp_path, monkeypatch):
    """The progress bar and TensorBoard share one computation of the teams' returns per PPO iteration."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import madistill.teacher as teacher
    from madistill.envs.teams import team_means
    from madistill.runtime import env_spec, make_vec_env
    from madistill.tb import TBLogger

    cfg = make_cfg("env=duel", "teacher.total_agent_steps=400")  # 2 iterations of 200 agent-steps
    calls = []
    monkeypatch.setattr(teacher, "team_means", lambda r, t: calls.append(len(r)) or team_means(r, t))
    spec = env_spec(cfg.env)
    tb = TBLogger(tmp_path / "tb")
    with make_vec_env(cfg.env, spec) as venv, teacher.TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb) as tr:
        tr.train(tmp_path)
    tb.close()
    assert tr.iteration == 2 and len(calls) == 2 and all(n > 0 for n in calls)
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    good, adversaries = (acc.Scalars(f"charts/team_return/{t}") for t in ("good", "adversaries"))
    assert [e.step for e in good] == [200, 400]
    assert [g.value for g in good] == pytest.approx([-a.value for a in adversaries])  # zero-sum


def test_stages_refuse_one_score_for_several_teams(cli, tmp_path):
    """In a zero-sum env the all-agent mean is 0 whatever happens: a worst action for victims on both sides has
    no one team to hurt. The worst action of one side's agent lowers its team's return, so it runs."""
    from conftest import tiny

    teacher = tmp_path / "t"
    rc, _, err = cli("train", *tiny("env=duel", "teacher.total_agent_steps=400"), f"hydra.run.dir={teacher}")
    assert rc == 0, err
    for stage, args, said in (
        ("cascade", [f"cascade.policy={teacher}", "fault=worst", "fault.victims=[agent_0,adversary_0]"],
         "fault 'worst' on agent_0, adversary_0 would lower one return for victims of several teams "
         "(adversaries, good)"),
        ("evaluate", [f"eval.policy={teacher}", "fault=worst", "fault.victims=[agent_0,adversary_0]"],
         "victims of several teams"),
    ):
        rc, _, err = cli(stage, *tiny(*args), f"hydra.run.dir={tmp_path / stage}")
        assert rc == 2 and said in err and not (tmp_path / stage).exists(), (stage, err)
    rc, _, err = cli("evaluate", *tiny(f"eval.policy={teacher}", "fault=worst", "fault.victims=[agent_0]",
                                       "eval.episodes=2"), f"hydra.run.dir={tmp_path / 'worst'}")
    assert rc == 0, err


def test_repair_in_an_env_of_several_teams_measures_the_repaired_groups_team(cli, tmp_path):
    """Duel's all-agent mean is 0 in every episode; the repair's returns are those of its group's team."""
    from conftest import tiny

    teacher = tmp_path / "t"
    rc, _, err = cli("train", *tiny("env=duel", "teacher.total_agent_steps=400"), f"hydra.run.dir={teacher}")
    assert rc == 0, err
    rc, _, err = cli("repair", *tiny(f"repair.policy={teacher}", "repair.group=agent", "attack.episodes=4",
                                     "repair.episodes=4", "attack.methods=[pgd]", "repair.eps=2"), f"hydra.run.dir={tmp_path / 'r'}")
    assert rc == 0, err
    payload = json.loads((tmp_path / "r" / "reports" / "repair.json").read_text())
    assert (payload["meta"]["team"], payload["meta"]["team_agents"]) == ("good", ["agent_0", "agent_1"])
    original = payload["original"]["evaluation"]
    assert any(x != 0 for x in original["clean_episodes"])
    assert original["clean"] == pytest.approx(np.mean(original["clean_episodes"]))
    assert "those of team good (agent_0, agent_1)" in (tmp_path / "r" / "reports" / "repair.md").read_text()
    # the suite's victim sets are checked before the repair's work
    rc, _, err = cli("repair", *tiny(f"repair.policy={teacher}", "attack.victims=[team:nope]"),
                     f"hydra.run.dir={tmp_path / 'bad'}")
    assert rc == 2 and "team:nope" in err and not (tmp_path / "bad").exists()


def test_repair_refuses_groups_whose_agents_play_on_several_teams():
    from madistill.stages.repair import _one_team_candidates

    sides = {"red": ("a_0",), "blue": ("b_0",)}
    mixed, red = SimpleNamespace(name="a", agents=("a_0", "b_0")), SimpleNamespace(name="r", agents=("a_0",))
    with pytest.raises(MadistillError, match=r"group\(s\) \['a'\] have agents on several teams \(red, blue\).*: "
                                             r"set repair.group to one of \['r'\]"):
        _one_team_candidates(sides, [mixed], [mixed, red])
    with pytest.raises(MadistillError, match="this env has no group of one team to repair"):
        _one_team_candidates(sides, [mixed], [mixed])
    assert _one_team_candidates(sides, [mixed, red], [mixed, red]) == [red]  # the group of one team is repaired
