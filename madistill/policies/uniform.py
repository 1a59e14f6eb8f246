"""A uniform-random policy: the reference point for "gain over random" and for random-action faults."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributions import Categorical, Distribution, Independent, Uniform

from madistill.envs.groups import AgentGroup
from madistill.policies.base import Policy


class UniformPolicy(Policy):
    """Uniform over the action space: flat logits (Discrete) or uniform in the Box."""

    kind = "uniform"

    def __init__(self, group: AgentGroup, arch: dict[str, Any] | None = None):
        super().__init__()
        self.group = group
        self.arch = dict(arch or {})
        if not group.discrete:
            self.register_buffer("low", torch.as_tensor(group.action_space.low, dtype=torch.float32).flatten())
            self.register_buffer("high", torch.as_tensor(group.action_space.high, dtype=torch.float32).flatten())
        # An empty parameter keeps the device visible to TeamPolicy.device.
        self._anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        # Zero logits / box centre, kept differentiable in obs (with zero gradient) for attack code paths.
        base = torch.zeros(obs.shape[0], self.group.act_dim, device=obs.device) + 0.0 * obs.sum(-1, keepdim=True)
        return base if self.group.discrete else base + (self.low + self.high) / 2

    def dist(self, obs: torch.Tensor) -> Distribution:
        if self.group.discrete:
            return Categorical(logits=self(obs))
        shape = (obs.shape[0], self.group.act_dim)
        return Independent(Uniform(self.low.expand(shape), self.high.expand(shape)), 1)

    @classmethod
    def from_arch(cls, group: AgentGroup, arch: dict[str, Any]) -> UniformPolicy:
        return cls(group, arch)
