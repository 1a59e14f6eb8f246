"""Students: compact MLP policies (no critic), trained by distillation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from madistill.envs.groups import AgentGroup
from madistill.policies.base import Policy
from madistill.policies.sb3 import activation


class MLPPolicy(Policy):
    """An MLP from normalised observation to logits (Discrete) or mean (Box, with a learned log-std)."""

    kind = "mlp"

    def __init__(self, group: AgentGroup, arch: dict[str, Any]):
        super().__init__()
        self.group = group
        self.arch = dict(arch)
        act = activation(arch["activation"])
        layers: list[nn.Module] = []
        width = group.obs_dim
        for h in arch["hidden_sizes"]:
            layers += [nn.Linear(width, h), act()]
            width = h
        layers.append(nn.Linear(width, group.act_dim))
        self.net = nn.Sequential(*layers)
        self._log_std = None if group.discrete else nn.Parameter(torch.zeros(group.act_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    def log_std(self) -> torch.Tensor | None:
        return self._log_std

    @classmethod
    def from_arch(cls, group: AgentGroup, arch: dict[str, Any]) -> MLPPolicy:
        return cls(group, arch)
