"""The lookahead target choice (targeted_lookahead) and the worst-action fault, on a constructed env whose most
harmful action is known by hand: myopic (horizon 0) it is action 2, over one more step action 3, while the
policy's own lowest-ranked action (targeted_lowest's target) is harmless."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from branch_helpers import TRAP_SPEC, trap_team
from omegaconf import OmegaConf

from madistill.attacks.lookahead import LookaheadAttack
from madistill.attacks.methods import Attack
from madistill.attacks.robustness import evaluate_robustness, markdown_report
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


def test_lookahead_refuses_box_victims():
    spec = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 5, "continuous_actions": True})
    with MultiAgentVecEnv(spec, 1) as venv:
        groups = venv.groups
    with pytest.raises(MadistillError, match="Discrete actions"):
        LookaheadAttack(Attack("targeted", "target"), ["listener_0"], {}, Branching(spec, groups))


def worst_rows(horizon: int, onset: int) -> tuple[np.ndarray, np.ndarray]:
    """[steps, copies, agents] intended and executed actions under fault worst on a_0 from ``onset`` on."""
    fc = OmegaConf.merge(OmegaConf.structured(FaultConfig),
                         {"name": "worst", "victims": ["a_0"], "onset": onset, "duration": None})
    with MultiAgentVecEnv(TRAP_SPEC, 2) as venv:
        attack = SimpleNamespace(lookahead_horizon=horizon, lookahead_gamma=0.99)
        fault = make_fault(fc, FaultEnv(venv.groups, feature_layouts(venv.groups), attack, "cpu", TRAP_SPEC))
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
