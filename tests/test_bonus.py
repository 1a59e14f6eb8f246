"""The message bonus (teacher.message_bonus): its numbers, that it reaches only its group's PPO rewards, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import compose_config, tiny
from torch.distributions import Categorical, Normal

from madistill.bonus import MutualInformationBonus
from madistill.errors import MadistillError
from madistill.runtime import env_spec, make_vec_env
from madistill.stages import train as train_stage
from madistill.teacher import TeacherTrainer


def test_the_bonus_is_each_actions_pointwise_mutual_information_with_the_observation():
    bonus = MutualInformationBonus(coef=0.5, n_actions=3, horizon=1)  # horizon 1: pbar is this step's mean policy
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])  # two observations, each with its own message
    pbar = [0.45, 0.45, 0.1]
    b = bonus(Categorical(probs=probs), torch.tensor([0, 0]), torch.tensor([True, True]))
    np.testing.assert_allclose(b.numpy(), [0.5 * math.log(0.8 / 0.45), 0.5 * math.log(0.1 / 0.45)], rtol=1e-5)
    assert b[1] < 0 < b[0]  # a message pays where it says something about what the agent sees
    # its mean under the policy is the mutual information I(S; A): zero for a speaker that ignores what it sees
    mi = np.mean([sum(p * math.log(p / q) for p, q in zip(row, pbar, strict=True)) for row in probs.tolist()])
    everyone = torch.ones(2, dtype=torch.bool)
    mean_bonus = np.mean(sum((bonus(Categorical(probs=probs), torch.full((2,), a), everyone) * probs[:, a]).numpy()
                             for a in range(3)))  # over observations, of the policy's expected bonus
    assert mean_bonus == pytest.approx(0.5 * mi, rel=1e-4)
    same = torch.tensor([[0.6, 0.3, 0.1]] * 2)
    mute = MutualInformationBonus(coef=0.5, n_actions=3, horizon=1)
    assert torch.allclose(mute(Categorical(probs=same), torch.tensor([0, 2]), torch.ones(2, dtype=torch.bool)), torch.zeros(2), atol=1e-6)
    assert mute.entropy() == pytest.approx(-sum(p * math.log(p) for p in (0.6, 0.3, 0.1)), rel=1e-5)


def test_the_running_average_follows_active_agents_only_and_inactive_ones_get_nothing():
    bonus = MutualInformationBonus(coef=1.0, n_actions=2, horizon=4)  # each step moves pbar a quarter of the way
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    b = bonus(Categorical(probs=probs), torch.tensor([0, 1]), torch.tensor([True, False]))
    torch.testing.assert_close(bonus.marginal, torch.tensor([0.5 + 0.25 * 0.4, 0.5 - 0.25 * 0.4]))
    assert b[1] == 0 and b[0] == pytest.approx(math.log(0.9 / 0.6), rel=1e-5)
    fresh = MutualInformationBonus(coef=1.0, n_actions=2, horizon=4)
    fresh.load_state_dict(bonus.state_dict())
    torch.testing.assert_close(fresh.marginal, bonus.marginal)


def test_the_bonus_needs_a_discrete_action_space():
    with pytest.raises(TypeError, match="Discrete"):
        MutualInformationBonus(1.0, 2, 4)(Normal(torch.zeros(2, 2), 1.0), torch.zeros(2, 2), torch.ones(2, dtype=torch.bool))


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
        train_stage.run(cfg, tmp_path)


def test_resume_restores_the_running_average_and_says_when_the_bonus_changes(tmp_path, caplog):
    base = ("env=simple_speaker_listener_v4", "env.num_envs=2", "teacher.ppo.n_steps=50", "teacher.ppo.batch_size=100")
    cfg = compose_config(tiny(*base, "teacher.total_agent_steps=200", "+teacher.message_bonus.speaker=5.0"))
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec, num_workers=0) as venv:
        trainer = TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None)
        trainer.train(tmp_path / "run")
        ckpt = trainer.save_checkpoint(tmp_path / "run" / "checkpoint")
        marginal = trainer.bonuses["speaker"].marginal
        for coef, warned in ((5.0, False), (1.0, True), (None, True)):
            caplog.clear()
            extra = (f"+teacher.message_bonus.speaker={coef}",) if coef else ()
            again = compose_config(tiny(*base, "teacher.total_agent_steps=400", f"teacher.resume={ckpt}", *extra))
            resumed = TeacherTrainer(again, venv, spec, torch.device("cpu"), tb=None)
            assert ("changes the message bonus" in caplog.text) == warned
            if coef:
                torch.testing.assert_close(resumed.bonuses["speaker"].marginal, marginal)
                assert resumed.bonuses["speaker"].coef == coef
