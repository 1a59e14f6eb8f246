"""Everything madistill relies on in stable-baselines3 beyond its documented ``learn()`` loop, in one place.

madistill collects the rollouts and calls SB3's ``PPO.train()`` itself, so it sets what ``learn()`` would have
set (the remaining progress the schedules read, the timestep count), reads SB3's logged values and update count,
and samples only the live entries of SB3's rollout buffer (a subclass that builds on the buffer's internals).
:func:`check_model` verifies every private attribute used here on a model, and :func:`check_buffer` the buffer
internals, so an SB3 release that changed one fails with a one-line error naming the installed version
(tests/test_sb3_adapter.py also checks that each one still means what this module assumes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import stable_baselines3
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import RolloutBufferSamples, Schedule
from stable_baselines3.common.utils import ConstantSchedule
from stable_baselines3.common.vec_env import VecEnv
from torch.distributions import Distribution

from madistill.errors import MadistillError

SB3_VERSION = stable_baselines3.__version__
TESTED_VERSION = "2.9.2"  # the release these internals were checked against
# names of the actor's parameters in SB3's ActorCriticPolicy: its MLP, its action head and (Box) its log-std
ACTOR_PREFIXES = ("mlp_extractor.policy_net.", "action_net.", "log_std")
_MODEL_ATTRIBUTES = ("_current_progress_remaining", "_n_updates", "num_timesteps", "ent_coef", "batch_size",
                     "max_grad_norm", "rollout_buffer")
# the buffer arrays PPO's minibatches are sampled from, in RolloutBufferSamples' order
_SAMPLED = ("observations", "actions", "values", "log_probs", "advantages", "returns")
_BUFFER_ATTRIBUTES = ("generator_ready", "swap_and_flatten", "device", "observations", "actions", "values",
                      "log_probs", "advantages", "returns", "full", "pos", "buffer_size", "n_envs")


def _changed(what: str) -> MadistillError:
    return MadistillError(f"stable-baselines3 {SB3_VERSION} changed {what}, which madistill relies on (checked with "
                          f"{TESTED_VERSION}): install stable-baselines3=={TESTED_VERSION}")


def check_model(model: PPO) -> None:
    """Refuse an SB3 whose PPO lacks an attribute this module reads or sets."""
    for name in _MODEL_ATTRIBUTES:
        if not hasattr(model, name):
            raise _changed(f"PPO (no attribute {name})")
    if not isinstance(getattr(model.logger, "name_to_value", None), dict):
        raise _changed("its Logger (no name_to_value dict)")
    check_buffer(model.rollout_buffer)


def check_buffer(buffer: RolloutBuffer) -> None:
    """Refuse an SB3 whose rollout buffer lacks an internal :class:`MaskedRolloutBuffer` builds on."""
    for name in _BUFFER_ATTRIBUTES:
        if not hasattr(buffer, name):
            raise _changed(f"RolloutBuffer (no attribute {name})")


class SpacesOnlyVecEnv(VecEnv):
    """Tells SB3's PPO the spaces and batch width to size its buffers for; madistill steps the real envs."""

    def __init__(self, num_envs: int, observation_space: spaces.Space, action_space: spaces.Space):
        super().__init__(num_envs, observation_space, action_space)

    def _unused(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("madistill collects rollouts itself; this placeholder env is never stepped")

    reset = step_async = step_wait = set_attr = env_method = _unused

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [None] * self.num_envs  # VecEnv.__init__ asks for render_mode

    def env_is_wrapped(self, wrapper_class: Any, indices: Any = None) -> list[bool]:
        return [False] * self.num_envs

    def close(self) -> None:
        pass


class MaskedRolloutBuffer(RolloutBuffer):
    """SB3's rollout buffer that samples only the entries where the agent was alive.

    Agents that terminated early (or are absent) still occupy a slot; their absorbing padding steps are
    stored but never reach PPO's losses.
    """

    rng: np.random.Generator | None = None  # minibatch order (None: numpy's global stream, as SB3's own buffer)

    def reset(self) -> None:
        super().reset()
        self.valid = np.zeros((self.buffer_size, self.n_envs), dtype=bool)

    def get(self, batch_size: int | None = None):  # type: ignore[override]
        assert self.full, "collect a full rollout before training"
        if not self.generator_ready:
            for name in _SAMPLED:
                self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])
            # one tensor view per array for the whole update (SB3 copies every minibatch from numpy instead);
            # the numpy arrays stay, as SB3's train() and live_observations read them. Actions become float32
            # as SB3's minibatches have them (Discrete ones are stored as integers).
            self.tensors = [torch.as_tensor(self.__dict__[name].astype(np.float32, copy=False) if name == "actions"
                                            else self.__dict__[name], device=self.device) for name in _SAMPLED]
            self.valid_idx = np.flatnonzero(self.swap_and_flatten(self.valid).ravel())
            self.generator_ready = True
        indices = (self.rng or np.random).permutation(self.valid_idx)
        batch_size = batch_size or len(indices)
        for start in range(0, len(indices), batch_size):
            yield self._get_samples(indices[start : start + batch_size])

    def _get_samples(self, batch_inds: np.ndarray, env: Any = None) -> RolloutBufferSamples:
        """SB3's minibatch (the same values, dtypes and shapes) gathered from the tensor views."""
        rows = torch.as_tensor(batch_inds, device=self.device)
        obs, actions, *flat = (t[rows] for t in self.tensors)
        return RolloutBufferSamples(obs, actions, *(t.flatten() for t in flat))

    def live_observations(self, n: int, rng: np.random.Generator, width: int, device: torch.device | str) -> torch.Tensor:
        """``n`` (at most all) distinct live observations drawn by ``rng``, their first ``width`` features, from
        the flattened buffer of an update in progress."""
        rows = rng.choice(self.valid_idx, size=min(int(n), len(self.valid_idx)), replace=False)
        return torch.as_tensor(self.observations[rows, :width], device=device)


class ScheduledEntropyPPO(PPO):
    """SB3's PPO whose entropy coefficient may be a schedule of the remaining progress, as SB3 already allows
    for the learning rate and the clip range (``teacher.anneal``)."""

    def __init__(self, *args: Any, ent_coef: float | Schedule = 0.0, **kwargs: Any):
        self.ent_coef_schedule = ent_coef if callable(ent_coef) else ConstantSchedule(float(ent_coef))
        super().__init__(*args, ent_coef=self.ent_coef_schedule(1.0), **kwargs)

    def train(self) -> None:
        self.ent_coef = float(self.ent_coef_schedule(self._current_progress_remaining))
        self.logger.record("train/ent_coef", self.ent_coef)
        # SB3 builds a torch distribution per minibatch, each checking its logits and actions; they come from this
        # model and its own buffer, so the checks only cost time (experiments/bench_update_modes.py --update).
        # torch keeps the switch process-wide, so while an update runs in the background thread other threads'
        # distributions built with the default skip their checks too; madistill's own policies set theirs
        # explicitly (validate_args=False), so the collector acts the same either way.
        validate = Distribution._validate_args
        Distribution.set_default_validate_args(False)
        try:
            super().train()
        finally:
            Distribution.set_default_validate_args(validate)


def set_progress(model: PPO, agent_steps: int, total: int) -> None:
    """What ``learn()`` sets before an update at ``agent_steps`` of ``total``: the timestep count and the
    remaining progress the learning-rate, clip-range and entropy schedules read."""
    model.num_timesteps = agent_steps
    model._current_progress_remaining = max(0.0, 1.0 - agent_steps / total)


def progress_done(model: PPO) -> float:
    """The share of training done at the model's current (or last) update."""
    return 1.0 - float(model._current_progress_remaining)


def update_count(model: PPO) -> int:
    """SB3's update count (epochs trained so far), which checkpoints keep."""
    return int(model._n_updates)


def set_update_count(model: PPO, n: int) -> None:
    """Restore the count :func:`update_count` read (a resumed run continues it)."""
    model._n_updates = int(n)


def take_logged(model: PPO, step: int) -> dict[str, float]:
    """The values SB3 logged since the last call (its losses and what hooks recorded), then cleared."""
    values = dict(model.logger.name_to_value)
    model.logger.dump(step)  # clears the values; madistill's models log to no outputs
    return values


def actor_parameters(policy: ActorCriticPolicy) -> list[torch.nn.Parameter]:
    """The actor's parameters of an SB3 actor-critic (not the critic's), in the policy's order."""
    return [p for n, p in policy.named_parameters() if n.startswith(ACTOR_PREFIXES)]


def actor_linears(policy: ActorCriticPolicy) -> list[torch.nn.Linear]:
    """The actor's linear layers of an SB3 actor-critic, input to output: its MLP's, then its action head."""
    return [m for m in policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)] + [policy.action_net]
