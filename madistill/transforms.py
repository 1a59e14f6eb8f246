"""Transforms of what the agents see and do: observation transforms between the env and the policies,
action transforms between choosing and stepping.

The rollout always normalises first (policies consume normalised observations), then applies the
configured observation chain in order (adversarial perturbation of victims, observation faults, ...); after
the policies choose, the action chain (action faults) changes what the env is given. Evaluation, robustness
and the cascade monitor differ only in these chains.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch.distributions import Distribution

from madistill.policies.base import TeamPolicy

GroupTensors = dict[str, torch.Tensor]


@dataclass
class StepContext:
    """What a transform may look at besides the observations."""

    team: TeamPolicy  # the acting policies (white-box attacks differentiate through them)
    step: int  # steps taken so far in this rollout
    episode_step: np.ndarray  # [N] steps since each copy's last reset
    active: GroupTensors  # [N, n_g] bool: agent alive and about to act
    generator: torch.Generator  # the rollout's RNG, so transforms are reproducible with the seed
    # [N] the seed of the episode each copy plays: per-episode draws (a fault's onset) depend on it alone
    episode_seed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class Transform:
    """What observation and action transforms share: hooks at a rollout's reset and at each copy's episode start."""

    # whether it draws from the rollout's generator (StepContext.generator), one stream for all copies, so
    # that its draws, and the episodes it plays, depend on how many copies play them (evaluator.episode_copies)
    shared_stream: ClassVar[bool] = False

    def reset(self) -> None:  # noqa: B027 - optional hook; stateless transforms need not override it
        """Forget what an earlier rollout left (called once when a rollout is reset); per-episode state is
        re-armed in :meth:`start_episodes`."""

    def start_episodes(self, copies: np.ndarray, seeds: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Env copies ``copies`` have just begun the episodes with seeds ``seeds`` (after ``reset`` too): a
        stateful transform re-arms its state for them, so each episode plays the same whatever came before."""


class ObsTransform(Transform, ABC):
    """Maps normalised observations ``{group: [N, n_g, d]}`` to the observations the policies act on."""

    @abstractmethod
    def __call__(self, obs: GroupTensors, ctx: StepContext) -> GroupTensors: ...


class ActionTransform(Transform, ABC):
    """Maps the actions the policies chose ``{group: [N, n_g]}`` (Discrete) or ``[N, n_g, a]`` (Box) to the
    actions the env is given (``dists``: each group's action distribution over its flat batch ``[N * n_g]``)."""

    @abstractmethod
    def __call__(self, actions: GroupTensors, dists: dict[str, Distribution], ctx: StepContext) -> GroupTensors: ...


def normalize(team: TeamPolicy, raw: dict[str, np.ndarray]) -> GroupTensors:
    """Raw env observations to normalised tensors on the team's device."""
    device = team.device
    return {g: team.normalizers[g].normalize(torch.as_tensor(x, device=device)) for g, x in raw.items()}


def apply_chain(chain: Sequence[ObsTransform], obs: GroupTensors, ctx: StepContext) -> GroupTensors:
    """Apply the transforms in order (each sees the previous one's output)."""
    for t in chain:
        obs = t(obs, ctx)
    return obs


def apply_action_chain(
    chain: Sequence[ActionTransform], actions: GroupTensors, dists: dict[str, Distribution], ctx: StepContext
) -> GroupTensors:
    """Apply the action transforms in order (each sees the previous one's output)."""
    for t in chain:
        actions = t(actions, dists, ctx)
    return actions
