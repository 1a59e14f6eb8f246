"""Teachers: SB3 actor-critic policies behind madistill's Policy interface."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy, BaseFeaturesExtractor
from torch import nn

from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.policies.base import Policy

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU}


def activation(name: str) -> type[nn.Module]:
    """The torch activation class for a config name (``tanh``, ``relu``, ...)."""
    if name not in ACTIVATIONS:
        raise MadistillError(f"unknown activation {name!r}: use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def sb3_observation_space(group: AgentGroup) -> spaces.Box:
    """SB3 sees the flattened, normalised observation: an unbounded float32 Box."""
    return spaces.Box(-np.inf, np.inf, shape=(group.obs_dim,), dtype=np.float32)


def build_sb3_policy(group: AgentGroup, arch: dict[str, Any]) -> ActorCriticPolicy:
    """A fresh SB3 ActorCriticPolicy with separate actor and critic MLPs of the given widths."""
    return ActorCriticPolicy(
        sb3_observation_space(group),
        group.action_space,
        lr_schedule=lambda _: 0.0,  # optimiser unused here: SB3's PPO rebuilds it when it trains
        **policy_kwargs(arch),
    )


def policy_kwargs(arch: dict[str, Any]) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` for a madistill architecture (actor and critic of the same hidden sizes)."""
    hidden = list(arch["hidden_sizes"])
    return {
        "net_arch": {"pi": hidden, "vf": hidden},
        "activation_fn": activation(arch["activation"]),
        "ortho_init": True,
    }


class SB3Policy(Policy):
    """Wraps an SB3 ``ActorCriticPolicy``; its actor gives the distribution, its critic the value."""

    kind = "sb3_actor_critic"

    def __init__(self, group: AgentGroup, sb3_policy: ActorCriticPolicy, arch: dict[str, Any]):
        super().__init__()
        self.group = group
        self.sb3 = sb3_policy
        self.arch = dict(arch)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        extractor: BaseFeaturesExtractor = self.sb3.pi_features_extractor
        latent = self.sb3.mlp_extractor.forward_actor(extractor(obs))
        return self.sb3.action_net(latent)

    def log_std(self) -> torch.Tensor | None:
        return None if self.group.discrete else self.sb3.log_std

    @property
    def acting_parameters(self) -> int:
        parts = [self.sb3.pi_features_extractor, self.sb3.mlp_extractor.policy_net, self.sb3.action_net]
        n = sum(p.numel() for m in parts for p in m.parameters())
        return n + (0 if self.group.discrete else self.sb3.log_std.numel())

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.sb3.predict_values(obs).squeeze(-1)

    @classmethod
    def from_arch(cls, group: AgentGroup, arch: dict[str, Any]) -> SB3Policy:
        return cls(group, build_sb3_policy(group, arch), arch)
