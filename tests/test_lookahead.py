"""The lookahead target choice (targeted_lookahead) and the worst-action fault, on a constructed env whose most
harmful action is known by hand: myopic (horizon 0) it is action 2, over one more step action 3, while the
policy's own lowest-ranked action (targeted_lowest's target) is harmless. Victim sets on a constructed env where
one agent attacked alone hurts more than both attacked each as if the other were clean; the suite's skip of the
lookahead where the env cannot branch."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from branch_helpers import MISS_SPEC, SIDES, SIDES_SPEC, TRAP_SPEC, trap_team
from cascade_helpers import copy_team, mlp_team
from omegaconf import OmegaConf

from madistill.attacks.lookahead import LookaheadAttack
from madistill.attacks.methods import Attack
from madistill.attacks.robustness import curves_figure, evaluate_robustness, markdown_report
from madistill.branching import Branching
from madistill.cascade.faults import FaultEnv, make_fault
from madistill.config import FaultConfig
from madistill.envs.factory import EnvSpec
from madistill.envs.features import feature_layouts
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.rollout import Rollout


@pytest.mark.parametrize("horizon,expected", [(0, -30.0), (1, -60.0)])
def test_lookahead_target_is_the_most_harmful_action_over_its_horizon(make_cfg, horizon, expected):
    ac = make_cfg("attack.methods=[targeted_lowest,targeted_lookahead]", "attack.eps=[4.0]", "attack.victims=[a_0]",
                  "attack.episodes=2", "attack.checks=false", f"attack.lookahead_horizon={horizon}").attack
    with MultiAgentVecEnv(TRAP_SPEC, 2) as venv:
        team = trap_team(venv)
        res = evaluate_robustness(venv, team, feature_layouts(venv.groups), ac, random_return=-20.0, seed=0)
    returns = res.returns["a_0"]
    assert res.clean == 0.0
    assert returns["targeted_lowest"][4.0] == 0.0  # the lowest-ranked action is harmless here
    # h = 0: action 2 every step (6 x -5); h = 1: action 3 (-1, then -11 while the trap stays armed), and at
    # the last step, with nothing after it, action 2 (-5 - 10)
    assert returns["targeted_lookahead"][4.0] == pytest.approx(expected)
    report = markdown_report({"trap": res}, "trap", 2)
    assert "`targeted_lookahead`: an attacker with a simulator of the env" in report


@pytest.mark.parametrize("joint", [1, 64])
def test_a_victim_set_is_never_reported_less_harmful_than_one_agent_alone(make_cfg, tmp_path, joint):
    """MissEnv costs 10 a step where the agents play different actions. Forcing a_0 alone off action 0 costs 60
    over 6 steps; on both agents, targeted_lowest forces both onto action 1 (no cost), and so does a lookahead
    that chooses each victim's target with the other clean (joint=1; 16 joint actions > 1). The joint lookahead
    (16 <= 64) finds the joint action that costs. Either way the worst case for all is -60, named by its attack
    and, where it came from the subset, by it, in the JSON, report, figure and printed summary."""
    from madistill.stages.attack import _summary

    cfg = make_cfg("attack.methods=[targeted_lowest,targeted_lookahead]", "attack.eps=[4.0]", "attack.victims=[all,a_0]",
                   "attack.episodes=2", "attack.checks=false", "attack.lookahead_horizon=0", f"attack.lookahead_joint={joint}")
    with MultiAgentVecEnv(MISS_SPEC, 2) as venv:
        res = evaluate_robustness(venv, trap_team(venv), feature_layouts(venv.groups), cfg.attack, random_return=-30.0, seed=0)
    assert res.clean == 0.0
    assert res.returns["a_0"] == {"targeted_lowest": {4.0: -60.0}, "targeted_lookahead": {4.0: -60.0}}
    assert res.returns["all"]["targeted_lowest"] == {4.0: 0.0}
    assert res.returns["all"]["targeted_lookahead"] == {4.0: -60.0 if joint > 1 else 0.0}
    name, source = ("targeted_lookahead", "all") if joint > 1 else ("targeted_lowest on a_0", "a_0")
    assert res.worst("all", 4.0) == (name, -60.0)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["worst_case"]["all"]["4.0"] == [name, -60.0] and d["worst_case_from"]["all"]["4.0"] == source
    assert f"| **worst case** | -60.00 [-60.00, -60.00] ({name}) |" in markdown_report({"t": res}, "miss", 2)
    top = curves_figure({"t": res}, "all", "miss").axes[0]
    (worst,) = [ln for ln in top.lines if ln.get_label() == "worst case"]
    assert list(worst.get_ydata()) == [-60.0] and [t.get_text() for t in top.texts] == [name]
    assert f"  t        clean 0.00 | victims all: eps 4: -60.00 ({name})" in _summary({"t": res}, cfg, "miss", None, tmp_path)


def test_lookahead_forces_every_victim_of_a_group_and_every_action_in_one_pgd_batch(make_cfg, monkeypatch):
    """Both TrapEnv agents share a group: one Attack.force per step for both victims and all 4 actions."""
    calls = []
    force = Attack.force
    monkeypatch.setattr(Attack, "force", lambda self, policy, x, *a, **k: calls.append(len(x)) or force(self, policy, x, *a, **k))
    ac = make_cfg("attack.methods=[targeted_lookahead]", "attack.eps=[4.0]", "attack.victims=[all]", "attack.episodes=2",
                  "attack.checks=false").attack
    with MultiAgentVecEnv(TRAP_SPEC, 2) as venv:
        evaluate_robustness(venv, trap_team(venv), feature_layouts(venv.groups), ac, random_return=-20.0, seed=0)
    assert calls == [4 * 2 * 2] * 6  # per step of the 6: 4 actions x 2 victims x 2 env copies


@pytest.mark.parametrize("use", [False, True])
def test_lookahead_adds_the_critic_only_when_asked(make_cfg, use):
    from madistill.attacks.robustness import suite_transforms

    ac = make_cfg(f"attack.lookahead_critic={use}").attack
    with MultiAgentVecEnv(TRAP_SPEC, 2) as venv:
        team = trap_team(venv)
        attack, _ = suite_transforms("targeted_lookahead", venv, team, ["a_0"], {}, ac, 0, None, critic=team)
    assert attack.critic is (team if use else None)


def test_lookahead_forces_with_its_own_restarts_and_the_suites_steps(make_cfg):
    from madistill.attacks.robustness import suite_transforms

    ac = make_cfg("attack.lookahead_restarts=7", "attack.steps=4", "attack.restarts=2").attack
    with MultiAgentVecEnv(TRAP_SPEC, 2) as venv:
        attack, _ = suite_transforms("targeted_lookahead", venv, trap_team(venv), ["a_0"], {}, ac, 0, None, None)
    assert (attack.attack.restarts, attack.attack.steps, attack.attack.method) == (7, 4, "targeted")
    with pytest.raises(MadistillError, match="lookahead_restarts"):
        make_cfg("attack.lookahead_restarts=0")


@pytest.mark.parametrize("case", ["box", "unseeded"])
def test_the_suite_skips_the_lookahead_with_a_note_where_the_env_cannot_branch(make_cfg, case):
    """Box victims, and an env whose episodes do not follow from their seed: the lookahead is skipped with a
    note per victim set naming why and the fix, the other attacks run."""
    if case == "box":
        spec = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 5, "continuous_actions": True})
        victims, why = ["all", "speaker_0"], "Box actions"
    else:
        spec = EnvSpec("cascade_helpers.UnseededRelay", {"n_symbols": 3, "switch_prob": 0.5, "max_cycles": 12})
        victims, why = ["all", "agent_1"], "not reproducible from its seed"
    ac = make_cfg("attack.methods=[random,targeted_lookahead]", "attack.eps=[0.3,4.0]", f"attack.victims=[{','.join(victims)}]",
                  "attack.episodes=2", "attack.checks=false").attack
    with MultiAgentVecEnv(spec, 2) as venv:
        team = mlp_team(venv, [8]) if case == "box" else copy_team(venv)
        res = evaluate_robustness(venv, team, feature_layouts(venv.groups), ac, random_return=-20.0, seed=0)
    assert {v: list(r) for v, r in res.returns.items()} == {v: ["random"] for v in victims}
    assert [s.split(":")[0] for s in res.skipped] == [f"targeted_lookahead on victims {v}" for v in victims]
    assert all(why in s for s in res.skipped), res.skipped
    assert f"- skipped targeted_lookahead on victims {victims[0]}: " in markdown_report({"t": res}, "env", 2)


def test_lookahead_refuses_box_victims():
    spec = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 5, "continuous_actions": True})
    with MultiAgentVecEnv(spec, 1) as venv:
        groups = venv.groups
    with pytest.raises(MadistillError, match="Discrete actions"):
        LookaheadAttack(Attack("targeted", "target"), ["listener_0"], {}, Branching(spec, groups))


def worst_rows(horizon: int, onset: int, spec: EnvSpec = TRAP_SPEC, teams: dict | None = None,
               victims: tuple[str, ...] = ("a_0",)) -> tuple[np.ndarray, np.ndarray]:
    """[steps, copies, agents] intended and executed actions under fault worst on ``victims`` from ``onset``
    on, in ``spec``'s env of ``teams``."""
    fc = OmegaConf.merge(OmegaConf.structured(FaultConfig),
                         {"name": "worst", "victims": list(victims), "onset": onset, "duration": None})
    with MultiAgentVecEnv(spec, 2) as venv:
        attack = SimpleNamespace(lookahead_horizon=horizon, lookahead_gamma=0.99)
        fault = make_fault(fc, FaultEnv(venv.groups, feature_layouts(venv.groups), attack, "cpu", spec, teams=teams))
        rollout = Rollout(venv, trap_team(venv), [fault], deterministic=True, seed=3)
        rows = [rollout.step() for _ in range(6)]
    g = venv.groups[0].name
    return (torch.stack([r.intended[g] for r in rows]).numpy(), torch.stack([r.actions[g] for r in rows]).numpy())


@pytest.mark.parametrize("horizon,picked", [(0, [2, 2, 2, 2]), (1, [3, 3, 3, 2])])
def test_worst_fault_plays_the_most_harmful_action_only_in_the_victims_slot_from_its_onset(horizon, picked):
    intended, executed = worst_rows(horizon, onset=2)
    assert (intended == 0).all()
    assert (executed[:, :, 1] == 0).all()  # the other agent's slot never changes
    assert (executed[:2, :, 0] == 0).all()  # nor the victim's before the onset
    assert (executed[2:, :, 0] == np.array(picked)[:, None]).all()


def test_worst_fault_refuses_box_groups():
    spec = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 5, "continuous_actions": True})
    fc = OmegaConf.merge(OmegaConf.structured(FaultConfig), {"name": "worst", "victims": ["listener_0"]})
    with MultiAgentVecEnv(spec, 1) as venv:
        env = FaultEnv(venv.groups, feature_layouts(venv.groups), None, "cpu", spec)
        with pytest.raises(MadistillError, match="fault 'worst' needs discrete actions"):
            make_fault(fc, env)


@pytest.mark.parametrize("teams,picked", [(SIDES, 2), (None, 3)])
def test_worst_fault_lowers_the_return_of_its_victims_team(teams, picked):
    """In SidesEnv a_0's action 2 costs its team (a_0) most, action 3 lowers the mean over both sides most."""
    _, executed = worst_rows(0, onset=0, spec=SIDES_SPEC, teams=teams)
    assert (executed[:, :, 0] == picked).all() and (executed[:, :, 1] == 0).all()


def test_worst_fault_refuses_victims_of_several_teams():
    with pytest.raises(MadistillError, match="victims of several teams \\(red, blue\\)"):
        worst_rows(0, onset=0, spec=SIDES_SPEC, teams=SIDES, victims=("a_0", "b_0"))


@pytest.mark.parametrize("victims,expected", [("team:red", -30.0), ("a_0", -30.0)])
def test_lookahead_lowers_the_return_of_its_victims_team(make_cfg, victims, expected):
    """With the sides known, the lookahead on a_0 forces action 2 (a_0's team loses 5 a step); scored over both
    sides, as without teams, it would force action 3 (a_0 loses 1 a step)."""
    ac = make_cfg("attack.methods=[targeted_lookahead]", "attack.eps=[4.0]", f"attack.victims=[{victims}]",
                  "attack.episodes=2", "attack.checks=false", "attack.lookahead_horizon=0").attack
    with MultiAgentVecEnv(SIDES_SPEC, 2) as venv:
        team = trap_team(venv)
        sided = evaluate_robustness(venv, team, feature_layouts(venv.groups), ac, random_return=0.0, seed=0,
                                    teams=SIDES, random_teams={"red": 0.0, "blue": 0.0})
        ac.victims = ["a_0"]
        one = evaluate_robustness(venv, team, feature_layouts(venv.groups), ac, random_return=0.0, seed=0)
    assert sided.team_episodes["red"][victims]["targeted_lookahead"][4.0] == pytest.approx([expected] * 2)
    assert one.agent_returns["a_0"]["targeted_lookahead"][4.0]["a_0"] == pytest.approx(-6.0)


@pytest.mark.parametrize("sides,picked", [(SIDES, [2, 0]), (None, [3, 0])])
def test_training_lookahead_targets_each_teams_agents_by_their_teams_return(make_cfg, sides, picked):
    """Robust training attacks every agent. With the sides known, a_0 is forced to action 2 (its team's worst)
    and b_0, whose action changes nobody's return, keeps its clean action 0; scored over both sides a_0 would be
    forced to action 3."""
    from madistill.attacks.budget import group_budgets
    from madistill.attacks.collection import collection_transforms

    ac = make_cfg("attack.lookahead_horizon=0").attack
    with MultiAgentVecEnv(SIDES_SPEC, 2) as venv:
        unit = group_budgets(1.0, feature_layouts(venv.groups), [], "cpu")
        transforms = collection_transforms(venv.groups, unit, "targeted_lookahead", 10, 1.0, 4.0, ac,
                                           Branching(SIDES_SPEC, venv.groups), sides=sides)
        rollout = Rollout(venv, trap_team(venv), transforms, deterministic=True, seed=0)
        executed = torch.stack([rollout.step().actions[venv.groups[0].name] for _ in range(3)]).numpy()
    assert (executed == np.array(picked)).all()
