"""The message bonus (teacher.message_bonus): its numbers, and that it reaches only its group's PPO rewards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import compose_config, tiny
from torch.distributions import Categorical, Normal

from madistill import stages
from madistill.bonus import MarginalEntropyBonus
from madistill.errors import MadistillError
from madistill.runtime import env_spec, make_vec_env
from madistill.teacher import TeacherTrainer


def test_the_bonus_pays_rare_actions_charges_common_ones_and_averages_zero():
    bonus = MarginalEntropyBonus(coef=0.5, n_actions=3, horizon=1)  # horizon 1: pbar is this step's mean policy
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    b = bonus(Categorical(probs=probs), torch.tensor([0, 2]), torch.tensor([True, True]))
    entropy = -sum(p * math.log(p) for p in (0.6, 0.3, 0.1))
    np.testing.assert_allclose(b.numpy(), [0.5 * (-math.log(0.6) - entropy), 0.5 * (-math.log(0.1) - entropy)], rtol=1e-5)
    assert b[0] < 0 < b[1]
    # its mean under pbar is zero: a group using every action as often as its policy says gains nothing on average
    every = bonus(Categorical(probs=probs[:1].expand(3, 3)), torch.arange(3), torch.ones(3, dtype=torch.bool))
    assert abs(float((every * probs[0]).sum())) < 1e-6
    assert bonus.entropy() == pytest.approx(entropy, rel=1e-5)


def test_the_running_average_follows_active_agents_only_and_inactive_ones_get_nothing():
    bonus = MarginalEntropyBonus(coef=1.0, n_actions=2, horizon=4)  # each step moves pbar a quarter of the way
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = bonus(Categorical(probs=probs), torch.tensor([0, 1]), torch.tensor([True, False]))
    torch.testing.assert_close(bonus.marginal, torch.tensor([0.5 + 0.25 * 0.5, 0.5 - 0.25 * 0.5]))
    assert b[1] == 0 and b[0] < 0  # action 0 is now the common one
    state = bonus.state_dict()
    fresh = MarginalEntropyBonus(coef=1.0, n_actions=2, horizon=4)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.marginal, bonus.marginal)


def test_the_bonus_needs_a_discrete_action_space():
    with pytest.raises(TypeError, match="Discrete"):
        MarginalEntropyBonus(1.0, 2, 4)(Normal(torch.zeros(2, 2), 1.0), torch.zeros(2, 2), torch.ones(2, dtype=torch.bool))


def _rewards(tmp_path, coef: float) -> dict[str, np.ndarray]:
    """Each group's PPO buffer rewards after one rollout of speaker-listener (same seed, same actions)."""
    extra = (f"+teacher.message_bonus.speaker={coef}",) if coef else ()
    cfg = compose_config(tiny("env=simple_speaker_listener_v4", "env.num_envs=2", "teacher.ppo.n_steps=50",
                              "teacher.ppo.batch_size=100", "teacher.total_agent_steps=200", *extra))
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec, num_workers=0) as venv:
        trainer = TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None)
        trainer.train(tmp_path / f"run{coef}")
        return {n: lr.model.rollout_buffer.rewards.copy() for n, lr in trainer.learners.items()}


def test_the_bonus_reaches_its_groups_ppo_rewards_in_proportion_to_its_coefficient(tmp_path):
    # a fresh speaker is nearly uniform, so its bonus is small: large coefficients keep it above float noise
    plain, once, twice = (_rewards(tmp_path, c) for c in (0.0, 5.0, 10.0))
    np.testing.assert_array_equal(once["listener"], plain["listener"])
    added = once["speaker"] - plain["speaker"]
    assert np.abs(added).max() > 1e-3
    np.testing.assert_allclose(twice["speaker"] - plain["speaker"], 2 * added, rtol=1e-3, atol=1e-5)


def test_a_bonus_for_a_group_the_env_lacks_is_a_user_error():
    cfg = compose_config(tiny("env=simple_speaker_listener_v4", "+teacher.message_bonus.speakr=0.05"))
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv, pytest.raises(MadistillError, match=r"unknown group.*speakr"):
        TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None)


def test_a_bonus_for_a_continuous_action_group_names_the_fix(tmp_path):
    cfg = compose_config(tiny("env=simple_speaker_listener_v4", "env.kwargs.continuous_actions=true",
                              "+teacher.message_bonus.speaker=0.05"))
    with pytest.raises(MadistillError, match=r"Discrete action space: remove teacher.message_bonus.speaker"):
        stages.train(cfg, tmp_path)
