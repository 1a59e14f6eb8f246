"""The PA-AD director (a PPO agent choosing per victim the target action that targeted PGD forces) and the check
that reports a learned attack weaker than the gradient attacks as under-trained. The constructed trap env
(tests/branch_helpers.py) has a known most harmful stationary target: action 3 at every step (-56 over 6 steps),
while targeted_lowest's target is harmless and a lookahead that knows the last step does better (-60)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from branch_helpers import COST, TRAP, TRAP_SPEC, trap_team

from madistill.attacks.budget import Budget
from madistill.attacks.checks import UNDER_TRAINED, training_checks
from madistill.attacks.learned import AdversaryEnv, Director, DirectorVecEnv
from madistill.attacks.methods import Attack
from madistill.attacks.robustness import evaluate_robustness, markdown_report
from madistill.envs.factory import EnvSpec
from madistill.envs.features import feature_layouts
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies.base import TeamPolicy
from madistill.policies.mlp import MLPPolicy

FORCE = Attack("targeted", "target")  # the suite's targeted PGD: 10 steps, 3 restarts


def _trap_team() -> TeamPolicy:
    with MultiAgentVecEnv(TRAP_SPEC, 1) as venv:
        return trap_team(venv)


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_director_env_forces_the_target_of_the_rank_it_picks(rank):
    team = _trap_team()
    budgets = {g.name: Budget.build(4.0, g.obs_dim) for g in team.groups}
    venv = DirectorVecEnv([lambda: AdversaryEnv(TRAP_SPEC, team, ["a_0"], budgets)], ["a_0"], budgets, FORCE, seed=0)
    assert venv.action_space.nvec.tolist() == [4]
    venv.reset()
    # the trap policy's logits at the clean observation are (1, -3, 0, 0): lowest first 1, 2, 3, then the greedy 0
    forced = [1, 2, 3, 0][rank]
    _, reward, *_ = venv.step(np.array([[rank]]))
    assert reward[0] == COST[forced]  # the director's reward is minus the team reward; a_1 plays its clean 0
    _, reward, *_ = venv.step(np.array([[0]]))  # action 1 next: costs nothing but the trap armed before
    assert reward[0] == (TRAP if forced == 3 else 0.0)


# plain rank 0 aims at the unreachable action 1 and does no damage; the reachable rank 0 forces action 2
@pytest.mark.parametrize("reachable, costs", [(True, [5.0, 1.0, 0.0, 0.0]), (False, [0.0, 5.0, 1.0, 0.0])])
def test_a_reachable_director_forces_the_rank_among_the_actions_the_budget_reaches(reachable, costs):
    team = _trap_team()
    # at eps 0.6 the trap policy's lowest-ranked action 1 is out of reach, 2, 3 and the greedy 0 are not
    budgets = {g.name: Budget.build(0.6, g.obs_dim) for g in team.groups}
    for rank, cost in enumerate(costs):
        venv = DirectorVecEnv([lambda: AdversaryEnv(TRAP_SPEC, team, ["a_0"], budgets)], ["a_0"], budgets, FORCE,
                              seed=0, reachable=reachable)
        venv.reset()
        _, reward, *_ = venv.step(np.array([[rank]]))
        assert reward[0] == cost


def test_director_learns_the_most_harmful_target_and_is_under_trained_only_against_a_stronger_attack(make_cfg):
    ac = make_cfg("attack.methods=[targeted_lowest,targeted_lookahead,director]", "attack.eps=[4.0]",
                  "attack.victims=[a_0]", "attack.episodes=2", "attack.checks=false", "attack.lookahead_horizon=1",
                  "attack.director_steps=1536", "attack.director_envs=4",
                  "attack.director_ppo={n_steps: 32, batch_size: 64, learning_rate: 0.003, ent_coef: 0.0}").attack
    with MultiAgentVecEnv(TRAP_SPEC, 2) as venv:
        res = evaluate_robustness(venv, trap_team(venv), feature_layouts(venv.groups), ac, random_return=-20.0, seed=0)
    returns = {a: r[4.0] for a, r in res.returns["a_0"].items()}
    # the director sees no clock, so its best is action 3 at every step; the lookahead plays 2 at the last one
    assert returns == {"targeted_lowest": 0.0, "targeted_lookahead": -60.0, "director": -56.0}
    curve = res.training["a_0"]["director"][4.0]
    assert [s for s, _ in curve] == list(range(128, 1537, 128))  # one point per rollout (32 steps x 4 copies)
    assert curve[-1][1] > 50.0 > curve[0][1]  # the director's episode return rose towards 56 while it learned
    (flag,) = res.under_trained["a_0"]
    assert flag.name == UNDER_TRAINED and "director return -56.00 > targeted_lookahead -60.00" in flag.detail
    assert "gap 4.00 [4.00, 4.00]" in flag.detail
    assert res.flags["a_0"] == []  # not a gradient-masking flag
    out = res.to_dict()
    assert out["training_checks"]["a_0"][0]["name"] == UNDER_TRAINED
    assert json.loads(json.dumps(out))["training_curves"]["a_0"]["director"]["4.0"] == [list(p) for p in curve]
    assert "a PPO director (PA-AD)" in out["threat_models"]["director"]
    report = markdown_report({"trap": res}, "trap", 2)
    assert "Learned attacks at full strength (at or below the strongest gradient attack): \n- **under_trained** (a_0)" in report


def test_under_trained_fires_only_for_a_learned_attack_above_the_strongest_gradient_attack():
    pgd = np.array([-10.0, -12.0, -14.0, -16.0])  # mean -13
    lowest = pgd - 4.0  # mean -17: the strongest gradient attack
    returns = {"pgd": {0.3: pgd, 1.0: pgd}, "targeted_lowest": {0.3: lowest}, "random": {0.3: pgd - 100},
               "offsets": {1.0: pgd - 100},  # neither is a gradient attack
               "director": {0.3: lowest, 1.0: pgd - 1.0}, "learned": {0.3: pgd, 1.0: pgd + 1.0}}
    flags = training_checks(returns)
    # at eps 0.3 the director matches targeted_lowest (at it: no flag), learned is 4 above it; at eps 1.0 only
    # pgd is a gradient attack: the director is below it, learned 1 above
    assert [f.name for f in flags] == [UNDER_TRAINED, UNDER_TRAINED]
    assert flags[0].detail.startswith("eps 0.3: learned return -13.00 > targeted_lowest -17.00")
    assert flags[1].detail.startswith("eps 1: learned return -12.00 > pgd -13.00")
    assert training_checks({"director": {0.3: pgd}}) == []  # nothing to compare with
    assert training_checks({"pgd": {0.3: pgd}, "director": {0.3: pgd - 0.5}}) == []


def test_director_box_targets_pull_the_mean_towards_the_target_point():
    spec = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 5, "continuous_actions": True})
    with MultiAgentVecEnv(spec, 1) as venv:
        groups = venv.groups
    torch.manual_seed(0)
    team = TeamPolicy(groups, {g.name: MLPPolicy(g, {"hidden_sizes": [8], "activation": "tanh"}) for g in groups},
                      {g.name: ObsNormalizer(g.obs_dim) for g in groups})
    budgets = {g.name: Budget.build(1.0, g.obs_dim) for g in groups}
    director = Director(team, ["listener_0"], budgets, FORCE)
    box = team["listener"].group.action_space
    assert np.array_equal(director.action_space.low, box.low) and np.array_equal(director.action_space.high, box.high)
    x = torch.randn(6, team["listener"].group.obs_dim)
    target = np.tile(box.high, (6, 1))  # the far corner
    delta = director.deltas(team, x, target, torch.Generator().manual_seed(0))
    assert delta.abs().max() <= 1.0 and delta.abs().max() > 0.5  # in radius units, inside the budget
    with torch.no_grad():
        before, after = team["listener"](x), team["listener"](x + delta)
    t = torch.as_tensor(target)
    assert ((after - t).norm(dim=-1) < (before - t).norm(dim=-1)).all()


@pytest.mark.parametrize("setting", ["director_steps", "director_envs"])
def test_director_settings_out_of_range_are_refused_naming_them(setting):
    from madistill.cli import compose_config

    with pytest.raises(MadistillError) as e:
        compose_config(["env=relay", f"attack.{setting}=0"])
    assert str(e.value) == f"attack.{setting} must be at least 1, got 0"


def test_director_refuses_victims_with_discrete_and_box_actions():
    team = _trap_team()
    box = Attack("targeted", "target")
    listener = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 5, "continuous_actions": True})
    with MultiAgentVecEnv(listener, 1) as venv:
        groups = venv.groups
    mixed = TeamPolicy([*team.groups, groups[1]], {**{g.name: team[g.name] for g in team.groups},
                                                   groups[1].name: MLPPolicy(groups[1], {"hidden_sizes": [4], "activation": "tanh"})},
                       {**team.normalizers, groups[1].name: ObsNormalizer(groups[1].obs_dim)})
    with pytest.raises(MadistillError, match="Discrete and Box actions: attack them as separate victim sets"):
        Director(mixed, ["a_0", groups[1].agents[0]], {}, box)


def test_attack_command_writes_the_learned_attacks_training_curves_to_tensorboard(cli, tmp_path):
    from conftest import tiny
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rc, _, err = cli("train", *tiny("teacher.total_agent_steps=1000"), f"hydra.run.dir={tmp_path / 't'}")
    assert rc == 0, err
    rc, out, err = cli("attack", *tiny(f"attack.policy={tmp_path / 't'}", "attack.methods=[pgd,learned,director]",
                                       "attack.eps=[0.5]", "attack.victims=[listener_0]", "attack.episodes=4",
                                       "attack.checks=false", "attack.learned_steps=256", "attack.learned_envs=2",
                                       "attack.learned_ppo={n_steps: 64, batch_size: 64}", "attack.director_steps=256",
                                       "attack.director_envs=4", "attack.director_ppo={n_steps: 32, batch_size: 64}"),
                       f"hydra.run.dir={tmp_path / 'a'}")
    assert rc == 0, err
    res = json.loads((tmp_path / "a" / "reports" / "robustness.json").read_text())["results"]["teacher"]
    ea = EventAccumulator(str(tmp_path / "a" / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    for method, rollout in (("learned", 128), ("director", 128)):
        curve = res["training_curves"]["listener_0"][method]["0.5"]
        # one point per rollout that ended an episode (25 steps): every rollout of 128 env steps does
        assert [s for s, _ in curve] == [rollout, 2 * rollout]
        scalars = ea.Scalars(f"attack_training/teacher/listener_0/{method}/eps0.5")
        assert [(e.step, e.value) for e in scalars] == [(s, pytest.approx(v)) for s, v in curve]
    weak = res["training_checks"]["listener_0"]
    assert ("learned attacks under-trained" in out) == bool(weak)


def test_the_attack_fault_refuses_the_director_in_one_line():
    from madistill.cascade.faults import AttackFault

    with pytest.raises(MadistillError, match="fault.method='director' is not a per-step attack the fault can play"):
        AttackFault(None, "director", {}, None)


def test_under_trained_reads_the_return_of_the_victims_team(make_cfg, monkeypatch):
    """In a zero-sum duel the learned attack lowers the good agent's return less than PGD (under-trained), while
    the adversaries' return, the mirror image, would make it look stronger."""
    from madistill.attacks import robustness
    from madistill.envs.episodes import EpisodeRecord

    good = {"clean": 0.0, "pgd": -5.0, "learned": -1.0}
    monkeypatch.setattr(robustness, "suite_transforms", lambda method, *a, **k: [method])
    monkeypatch.setattr(robustness, "run_episodes", lambda venv, team, episodes, seed, transforms=(): [
        EpisodeRecord(seed + i, 5, {"adversary_0": -good[transforms[-1] if transforms else "clean"] - i,
                                    "agent_0": good[transforms[-1] if transforms else "clean"] + i})
        for i in range(episodes)])
    ac = make_cfg("attack.methods=[pgd,learned]", "attack.eps=[0.1]", "attack.victims=[agent_0]", "attack.episodes=4",
                  "attack.checks=false").attack
    spec = EnvSpec("envs.duel.parallel_env", {"n": 1, "max_cycles": 8}, name="duel")
    with MultiAgentVecEnv(spec, 1) as venv:
        team = TeamPolicy(venv.groups, {g.name: MLPPolicy(g, {"hidden_sizes": [], "activation": "tanh"}) for g in venv.groups},
                          {g.name: ObsNormalizer(g.obs_dim) for g in venv.groups})
        teams = {"good": ["agent_0"], "adversaries": ["adversary_0"]}  # the victims' team first
        res = evaluate_robustness(venv, team, feature_layouts(venv.groups), ac, 0.0, 0, teams=teams,
                                  random_teams={"adversaries": 0.0, "good": 0.0})
    (flag,) = res.under_trained["agent_0"]
    assert flag.detail.startswith("eps 0.1: learned return 0.50 > pgd -3.50")


def test_an_alternating_director_goes_on_learning_in_each_training_and_forces_its_targets_on_a_surrogate(make_cfg):
    """Robust training's director (ATLA-style alternation): each training continues the same PPO model in episodes
    of its own; two trainings of half the steps learn the trap's most harmful target as one full training does,
    and the transform forces the targets on the surrogate it is given, whoever acts."""
    from madistill.attacks.collection import training_director
    from madistill.evaluate.evaluator import run_episodes, uniform_team

    ac = make_cfg("attack.director_retrain_steps=768", "attack.director_envs=4",
                  "attack.director_ppo={n_steps: 32, batch_size: 64, learning_rate: 0.003, ent_coef: 0.0}").attack
    with MultiAgentVecEnv(TRAP_SPEC, 2) as venv:
        team = trap_team(venv)
        budgets = {g.name: Budget.build(4.0, g.obs_dim) for g in team.groups}
        director = training_director(TRAP_SPEC, venv.groups, 10, ac, seed=0)
        seeds = []
        reset = AdversaryEnv.reset
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(AdversaryEnv, "reset", lambda self, seed=None, **k: seeds.append(seed) or reset(self, seed=seed, **k))
            director.train_against(team, budgets, 1.0)
            model = director.model
            director.train_against(team, budgets, 1.0)
        assert director.model is model and model.num_timesteps == 1536 and director.rounds == 2
        assert [s for s, _ in director.curve.points] == list(range(128, 1537, 128))
        given = [s for s in seeds if s is not None]  # the seeds each training starts its 4 copies from
        assert len(given) == 8 and not set(given[:4]) & set(given[4:])  # each training plays episodes of its own
        returns = [r.team_return for r in run_episodes(venv, team, 2, 0, transforms=[director.transform(budgets, 1.0)])]
        # every agent a victim: one forced onto 2 and the other onto 3 at every step is the most harmful stationary
        # choice, -(5 + 1) at the first step, then -(5 + 1) - 10 with the trap armed at each of the 5 others
        assert returns == [-86.0, -86.0]
        # crafted on the trap team while a uniform team acts: the perturbations move the trap team, not the actors
        attack = director.transform(budgets, 1.0, surrogate=team)
        assert attack.surrogate is team
        forced = []
        deltas = Director.deltas
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Director, "deltas", lambda self, t, *a: forced.append(t) or deltas(self, t, *a))
            run_episodes(venv, uniform_team(venv), 1, 0, transforms=[attack])
        assert forced and all(t is team for t in forced)
