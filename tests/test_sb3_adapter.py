"""What madistill relies on in stable-baselines3's internals (madistill/sb3_adapter.py) still holds: each
assertion names the installed SB3 version, so an SB3 release that changed one fails here, loudly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.buffers import RolloutBuffer
from torch.distributions import Distribution

from madistill.envs import EnvSpec, group_agents, make_env
from madistill.errors import MadistillError
from madistill.sb3_adapter import (
    SB3_VERSION,
    actor_linears,
    actor_parameters,
    check_buffer,
    check_model,
    set_progress,
    set_update_count,
    take_logged,
    update_count,
)
from madistill.teacher import build_model

SB3 = f"stable-baselines3 {SB3_VERSION}"
N_STEPS, N_ENVS, BATCH, EPOCHS = 8, 2, 16, 2


@pytest.fixture
def model():
    env = make_env(EnvSpec("mpe2.simple_spread_v3.parallel_env", {"N": 3}))
    (group,) = group_agents(env)
    env.close()
    settings = {"n_steps": N_STEPS, "batch_size": BATCH, "n_epochs": EPOCHS, "learning_rate": lambda left: 1e-3 * left}
    return build_model(group, N_ENVS, {"hidden_sizes": [8], "activation": "tanh", "team_state_dim": 0}, settings, 0, "cpu")


def _fill(model, live: np.ndarray) -> None:
    """A full rollout whose observations hold their flat row index; ``live[step, slot]`` marks live entries."""
    buf = model.rollout_buffer
    rows = np.arange(buf.buffer_size * buf.n_envs).reshape(buf.n_envs, buf.buffer_size).T  # flattened slot-major
    buf.observations[:] = rows[..., None]
    buf.advantages[:] = np.random.default_rng(0).normal(size=buf.advantages.shape)
    buf.valid[:], buf.full = live, True


def test_this_sb3_has_every_internal_the_adapter_uses(model):
    check_model(model)  # build_model checks it too


def test_a_changed_internal_is_a_one_line_error_naming_the_sb3_version(model):
    del model._n_updates
    with pytest.raises(MadistillError) as err:
        check_model(model)
    assert SB3 in str(err.value) and "_n_updates" in str(err.value) and "\n" not in str(err.value)
    del model.rollout_buffer.generator_ready
    with pytest.raises(MadistillError, match=f"{SB3_VERSION} changed RolloutBuffer .no attribute generator_ready"):
        check_buffer(model.rollout_buffer)


def test_progress_reaches_the_schedules_and_the_update_count_and_log_are_sb3s(model):
    _fill(model, np.ones((N_STEPS, N_ENVS * 3), dtype=bool))
    set_progress(model, 25, 100)
    model.train()
    logged = take_logged(model, 25)
    assert logged["train/learning_rate"] == pytest.approx(0.75e-3), f"{SB3}: the learning-rate schedule no longer reads the progress set"
    assert model.num_timesteps == 25
    assert update_count(model) == EPOCHS, f"{SB3}: _n_updates no longer counts the epochs trained"
    assert take_logged(model, 25) == {}, f"{SB3}: Logger.dump no longer clears name_to_value"
    set_update_count(model, 7)
    assert update_count(model) == 7


def test_an_update_skips_distribution_checks_and_restores_the_switch(model, monkeypatch):
    seen = []
    evaluate = model.policy.evaluate_actions
    monkeypatch.setattr(model.policy, "evaluate_actions",
                        lambda *a: seen.append(Distribution._validate_args) or evaluate(*a))
    _fill(model, np.ones((N_STEPS, N_ENVS * 3), dtype=bool))
    before = Distribution._validate_args
    model.train()
    assert seen and not any(seen) and Distribution._validate_args == before


def test_the_masked_buffer_samples_only_live_entries_once_each(model):
    live = np.zeros((N_STEPS, N_ENVS * 3), dtype=bool)
    live[::2, :4] = True
    _fill(model, live)
    seen = np.concatenate([b.observations[:, 0].numpy() for b in model.rollout_buffer.get(5)])
    expected = np.sort(model.rollout_buffer.observations[model.rollout_buffer.valid_idx, 0])
    assert len(seen) == live.sum() and np.array_equal(np.sort(seen), expected), f"{SB3}: RolloutBuffer.get changed"
    # the flattened rows are slot-major (SB3's swap_and_flatten): a live entry's row holds its own index
    assert np.array_equal(expected, np.sort(np.flatnonzero(live.T.ravel()))), f"{SB3}: swap_and_flatten changed"
    obs = model.rollout_buffer.live_observations(100, np.random.default_rng(0), 4, "cpu")
    assert obs.shape == (live.sum(), 4) and set(obs[:, 0].tolist()) == set(expected.tolist())


def test_actor_parameters_are_the_actors_and_not_the_critics(model):
    names = {id(p): n for n, p in model.policy.named_parameters()}
    actor = [names[id(p)] for p in actor_parameters(model.policy)]
    assert actor == ["mlp_extractor.policy_net.0.weight", "mlp_extractor.policy_net.0.bias", "action_net.weight",
                     "action_net.bias"], f"{SB3}: ActorCriticPolicy's parameter names changed"
    layers = actor_linears(model.policy)
    assert [(m.in_features, m.out_features) for m in layers] == [(18, 8), (8, 5)], f"{SB3}: the actor's layers changed"
    assert [p for m in layers for p in (m.weight, m.bias)] == actor_parameters(model.policy)


def test_masked_minibatches_are_sb3s_own(model):
    """The minibatches gathered from tensor views hold what SB3's RolloutBuffer._get_samples gives for the
    same rows: the same fields in the same order, values, dtypes and shapes."""
    live = np.ones((N_STEPS, N_ENVS * 3), dtype=bool)
    _fill(model, live)
    buf = model.rollout_buffer
    rng = np.random.default_rng(1)
    for name in ("actions", "values", "log_probs", "returns"):  # distinct values per field, so a swap shows
        buf.__dict__[name][:] = rng.normal(size=buf.__dict__[name].shape)
    buf.rng = np.random.default_rng(2)
    batches = list(buf.get(BATCH))
    rows = np.random.default_rng(2).permutation(buf.valid_idx)[:BATCH]
    ours, sb3 = batches[0], RolloutBuffer._get_samples(buf, rows)
    assert ours._fields == sb3._fields
    for a, b in zip(ours, sb3):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{SB3}: RolloutBuffer._get_samples changed"
