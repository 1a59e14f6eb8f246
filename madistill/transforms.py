"""Observation transforms applied between the env and the policies.

The rollout always normalises first (policies consume normalised observations), then applies the
configured chain in order: adversarial perturbation of victims, fault injection, ... Evaluation, robustness
and the cascade monitor differ only in this chain.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

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


class ObsTransform(ABC):
    """Maps normalised observations ``{group: [N, n_g, d]}`` to the observations the policies act on."""

    @abstractmethod
    def __call__(self, obs: GroupTensors, ctx: StepContext) -> GroupTensors: ...

    def reset(self) -> None:  # noqa: B027 - optional hook; stateless transforms need not override it
        """Forget per-episode state (called when a rollout is reset)."""


def normalize(team: TeamPolicy, raw: dict[str, np.ndarray]) -> GroupTensors:
    """Raw env observations to normalised tensors on the team's device."""
    device = team.device
    return {g: team.normalizers[g].normalize(torch.as_tensor(x, device=device)) for g, x in raw.items()}


def apply_chain(chain: Sequence[ObsTransform], obs: GroupTensors, ctx: StepContext) -> GroupTensors:
    """Apply the transforms in order (each sees the previous one's output)."""
    for t in chain:
        obs = t(obs, ctx)
    return obs
