"""What madistill relies on in stable-baselines3's internals (madistill/sb3_adapter.py) still holds: each
assertion names the installed SB3 version, so an SB3 release that changed one fails here, loudly."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import MultiCategoricalDistribution
from torch.distributions import Distribution

from madistill import ppo_losses, sb3_adapter
from madistill.envs import EnvSpec, group_agents, make_env
from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.policies.sb3 import ACTIVATIONS
from madistill.sb3_adapter import (
    SB3_VERSION,
    ScheduledEntropyPPO,
    actor_linears,
    actor_parameters,
    check_buffer,
    check_model,
    fast_update_unsupported,
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
    model.fast_update = False  # SB3's train() builds the distributions; madistill's fast_train builds none
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
    """The minibatches gathered from the packed rollout hold what SB3's RolloutBuffer._get_samples gives for the
    same rows: the same fields in the same order, values, dtypes, shapes and memory layout (a strided column
    reduces to other floats: the advantages' mean and std, and with them every trained weight)."""
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
        assert a.stride() == b.stride() and a.is_contiguous()


# ---- the fast update (fast_train) against SB3's PPO.train() --------------------------------------------------

FAST_STEPS, FAST_ENVS, FAST_BATCH, FAST_EPOCHS = 16, 4, 24, 3
DISCRETE, BOX = spaces.Discrete(5), spaces.Box(-1, 1, (3,), np.float32)


IMAGE = spaces.Box(0, 255, (10, 10, 3), np.uint8)
TINY_CNN = {"channels": [4], "kernels": [3], "strides": [2], "max_grid": 2, "features_dim": 8}


def _ppo(action_space: spaces.Space, fast: bool, team_state_dim: int = 0, obs_space: spaces.Box | None = None,
         activation: str = "tanh", **settings):
    """A tiny PPO of two agents in ``FAST_ENVS`` copies over a filled rollout: live entries, partly dead ones, a
    last minibatch shorter than the others, and a seeded minibatch order. ``obs_space``: the agents' (default: 6
    floats); an image space gets a CNN encoder."""
    group = AgentGroup("g", ("a_0", "a_1"), obs_space or spaces.Box(-1, 1, (6,), np.float32), action_space)
    arch = {"hidden_sizes": [16, 16], "activation": activation, "team_state_dim": team_state_dim}
    if group.image_shape is not None:
        arch["cnn"] = TINY_CNN
    settings = {"n_steps": FAST_STEPS, "batch_size": FAST_BATCH, "n_epochs": FAST_EPOCHS, "ent_coef": 0.01,
                "learning_rate": 3e-3, **settings}
    model = build_model(group, FAST_ENVS, arch, settings, 0, "cpu")
    model.fast_update = fast
    buf, rng = model.rollout_buffer, np.random.default_rng(1)
    buf.observations[:] = rng.uniform(0, 255, size=buf.observations.shape) if arch.get("cnn") else rng.normal(size=buf.observations.shape)
    if isinstance(action_space, spaces.Discrete):
        buf.actions[:] = rng.integers(0, action_space.n, size=buf.actions.shape)
    else:
        buf.actions[:] = rng.normal(size=buf.actions.shape)
    for name in ("values", "returns", "advantages"):
        buf.__dict__[name][:] = rng.normal(size=buf.__dict__[name].shape)
    with torch.no_grad():  # the acting policy's log-probabilities: ratios start at 1, the KL at 0
        rows = buf.n_envs * buf.buffer_size
        actions = torch.as_tensor(buf.actions.reshape(rows, -1))
        _, log_prob, _ = model.policy.evaluate_actions(torch.as_tensor(buf.observations.reshape(rows, -1)),
                                                       actions.long().flatten() if buf.actions.dtype.kind == "i" else actions)
    buf.log_probs[:] = log_prob.numpy().reshape(buf.log_probs.shape)
    buf.valid[:] = rng.random(buf.valid.shape) < 0.9
    buf.full, buf.rng = True, np.random.default_rng(5)
    return model


def _minibatches(model) -> int:
    """Minibatches per epoch: the rollout's live entries in minibatches of ``FAST_BATCH``, the last one shorter."""
    return -(-int(model.rollout_buffer.valid.sum()) // FAST_BATCH)


def _updates(model, fast: list[bool]) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Update ``model`` once per entry of ``fast`` (the fast update or SB3's) on its rollout, at progress 0, 1/4,
    ...; its parameters after them, and the values each update logged."""
    logged = []
    for i, f in enumerate(fast):
        model.fast_update = f
        set_progress(model, 100 * i, 400)
        model.train()
        logged.append(take_logged(model, i))
    return torch.cat([p.detach().flatten() for p in model.policy.parameters()]), logged


CASES = {
    "plain": {},
    "clip_range_vf": {"clip_range_vf": 0.1},
    "target_kl": {"target_kl": 2e-3},  # stops early in some update (asserted below)
    "no_entropy": {"ent_coef": 0.0},  # the entropy term is left out of the backward pass
    "schedules": {"learning_rate": lambda left: 3e-3 * left, "clip_range": lambda left: 0.1 + 0.2 * left,
                  "ent_coef": lambda left: 0.05 * left},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["Discrete", "Box"])
@pytest.mark.parametrize("critic", ["local", "central", "cnn"])
def test_the_fast_update_learns_what_sb3s_train_learns(action_space, case, critic):
    """Same rollout, same seed: two fast updates give the parameters, logged losses and update count of two of
    SB3's; a fast update followed by SB3's too (the fast one leaves SB3 the optimiser state it would have left).
    Critics: the agent's own, a centralised one, and a CNN encoder shared by actor and critic."""
    net = {"central": {"team_state_dim": 4}, "cnn": {"obs_space": IMAGE}}.get(critic, {})
    assert fast_update_unsupported(_ppo(action_space, True, **net, **CASES[case])) is None
    sb3_params, sb3_logged = _updates(sb3 := _ppo(action_space, False, **net, **CASES[case]), [False, False])
    for fast in ([True, True], [True, False]):
        params, logged = _updates(model := _ppo(action_space, True, **net, **CASES[case]), fast)
        assert torch.equal(params, sb3_params)  # bit for bit: a run reproduces the weights SB3 trains
        for ours, theirs in zip(logged, sb3_logged):
            assert ours.keys() == theirs.keys()
            for key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key
        assert update_count(model) == update_count(sb3)
    assert (update_count(sb3) < 2 * FAST_EPOCHS) == (case == "target_kl")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["Discrete", "Box"])
@pytest.mark.parametrize("critic", ["local", "central", "cnn"])
def test_the_critic_thread_computes_the_same_floats_as_one_thread(action_space, case, critic, monkeypatch):
    """``critic_thread``: the critic's pass in its own thread gives bit-identical parameters, logged values and
    update count, and runs once per minibatch; a CNN encoder that feeds both heads keeps the joint pass."""
    net = {"central": {"team_state_dim": 4}, "cnn": {"obs_space": IMAGE}}.get(critic, {})
    one = _ppo(action_space, True, critic_thread=False, **net, **CASES[case])
    one_params, one_logged = _updates(one, [True, True])
    jobs = []
    submit = sb3_adapter._CriticThread.submit
    monkeypatch.setattr(sb3_adapter._CriticThread, "submit", lambda self, *args: jobs.append(1) or submit(self, *args))
    two = _ppo(action_space, True, critic_thread=True, **net, **CASES[case])
    params, logged = _updates(two, [True, True])
    assert torch.equal(params, one_params)
    assert logged == one_logged and update_count(two) == update_count(one)
    steps = float(two.policy.optimizer.state[next(two.policy.parameters())]["step"])
    # one job per optimiser step, and one more for each update that stopped early (its gradient is dropped)
    extra = (0, 0) if case != "target_kl" else (1, 2)
    assert steps > 0 and (critic == "cnn" and not jobs or steps + extra[0] <= len(jobs) <= steps + extra[1])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["Discrete", "Box"])
@pytest.mark.parametrize("critic", ["local", "central"])
def test_the_compiled_passes_compute_the_floats_of_the_modules_joint_pass(action_space, case, critic, monkeypatch):
    """Each head's pass as one TorchScript call gives bit for bit the parameters and logged values of SB3's joint
    loss back-propagated through the policy's modules (the path a CNN encoder shared by both heads takes)."""
    net = {"central": {"team_state_dim": 4}}.get(critic, {})
    compiled = _updates(_ppo(action_space, True, critic_thread=False, **net, **CASES[case]), [True, True])
    monkeypatch.setattr(sb3_adapter, "_compiled_passes", lambda *a: None)
    eager = _updates(_ppo(action_space, True, critic_thread=False, **net, **CASES[case]), [True, True])
    assert torch.equal(compiled[0], eager[0]) and compiled[1] == eager[1]


def test_every_config_activation_has_a_compiled_code():
    """A config's activation without a code would quietly send every update down the slower path."""
    assert set(ACTIVATIONS.values()) <= set(ppo_losses.ACTIVATION_CODES)


@pytest.mark.parametrize("activation", sorted(set(ACTIVATIONS) - {"tanh"}) + ["leaky_relu"])
def test_the_critic_thread_runs_every_config_activation_to_the_same_floats(activation, monkeypatch):
    """Each activation a config may name runs in the critic thread's TorchScript job to the floats of one thread;
    a critic with any other module (here LeakyReLU) keeps its update in one thread, where it trains alike."""
    def build(critic_thread: bool):
        model = _ppo(BOX, True, critic_thread=critic_thread, activation=activation.replace("leaky_relu", "relu"))
        if activation == "leaky_relu":
            model.policy.mlp_extractor.value_net[1] = torch.nn.LeakyReLU()
        return model

    one_params, one_logged = _updates(build(False), [True])
    jobs = []
    submit = sb3_adapter._CriticThread.submit
    monkeypatch.setattr(sb3_adapter._CriticThread, "submit", lambda self, *args: jobs.append(1) or submit(self, *args))
    params, logged = _updates(build(True), [True])
    assert torch.equal(params, one_params) and logged == one_logged
    assert len(jobs) == (0 if activation == "leaky_relu" else FAST_EPOCHS * _minibatches(_ppo(BOX, True)))


def test_an_error_in_the_critic_thread_is_raised_and_leaves_the_parameters_in_their_own_storage(monkeypatch):
    model = _ppo(DISCRETE, True)
    before = [p.detach().clone() for p in model.policy.parameters()]
    compiled = ppo_losses.compiled
    monkeypatch.setattr(ppo_losses, "compiled", lambda name: compiled(name) if "actor" in name else
                        lambda *a: (_ for _ in ()).throw(RuntimeError("critic failed")))
    with pytest.raises(RuntimeError, match="critic failed"):
        _updates(model, [True])
    params = list(model.policy.parameters())
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # no step was taken
    storages = [p.untyped_storage().data_ptr() for p in params]
    assert len(set(storages)) == len(storages) and all(p.grad is None for p in params)
    assert not [t for t in threading.enumerate() if t.name == "madistill-critic"]


def test_step_hooks_run_before_each_optimiser_step_of_either_update():
    """A hook's gradient change takes effect in both updates alike, once per minibatch step."""
    results = []
    for fast in (False, True):
        model, calls = _ppo(DISCRETE, fast), []

        def hook(model=model, calls=calls) -> None:
            calls.append(1)
            model.policy.action_net.bias.grad.add_(1.0)  # in place, as madistill's extra losses add theirs

        model.step_hooks.append(hook)
        results.append((_updates(model, [fast])[0], len(calls)))
    (sb3, sb3_calls), (ours, our_calls) = results
    assert sb3_calls == our_calls == FAST_EPOCHS * _minibatches(_ppo(DISCRETE, True))
    assert torch.equal(ours, sb3)


def test_the_fast_update_leaves_parameters_and_optimiser_state_in_their_own_storage():
    model = _ppo(BOX, True)
    _updates(model, [True])
    params = list(model.policy.parameters())
    state = model.policy.optimizer.state
    storages = [t.untyped_storage().data_ptr() for p in params for t in (p, state[p]["exp_avg"], state[p]["exp_avg_sq"])]
    assert len(set(storages)) == len(storages) and all(p.is_contiguous() and p.grad is None for p in params)
    assert {float(state[p]["step"]) for p in params} == {FAST_EPOCHS * _minibatches(model)}


@pytest.mark.parametrize("change, said", [
    (lambda m: m.policy.optimizer.param_groups[0].update(weight_decay=0.1), "weight decay"),
    (lambda m: setattr(m.policy, "action_dist", MultiCategoricalDistribution([2, 3])), "MultiCategoricalDistribution"),
])
def test_a_model_the_fast_update_does_not_support_gets_sb3s(change, said, monkeypatch):
    model = _ppo(DISCRETE, True)
    change(model)
    assert said in fast_update_unsupported(model)
    called = []
    monkeypatch.setattr(PPO, "train", lambda self: called.append(self))
    model.train()
    assert called == [model]


def test_a_model_with_step_hooks_saves_and_loads_as_sb3_does(tmp_path):
    """SB3's .zip keeps the settings, not the hooks (closures over a trainer); the loaded model runs hooks added later."""
    model = _ppo(DISCRETE, True)
    model.step_hooks.append(lambda: None)
    model.save(tmp_path / "model.zip")
    loaded = ScheduledEntropyPPO.load(tmp_path / "model.zip", device="cpu")
    assert loaded.step_hooks == [] and loaded.fast_update is True
    calls = []
    loaded.step_hooks.append(lambda: calls.append(1))
    loaded.policy.optimizer.step()  # SB3's update steps the optimiser, whose pre-step hook runs them
    assert calls == [1]
