"""Students: compact MLP policies (no critic), trained by distillation; over a small CNN encoder where their
group observes images."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from madistill.envs.groups import AgentGroup
from madistill.policies.base import Policy
from madistill.policies.cnn import ImageEncoder
from madistill.policies.sb3 import activation


class MLPPolicy(Policy):
    """An MLP from normalised observation to logits (Discrete) or mean (Box, with a learned log-std).

    For a group observing images, ``arch["cnn"]`` (``student.cnn``) puts an :class:`ImageEncoder` before the
    MLP; other groups ignore it (and do not record it), so one arch serves every group of a team.
    """

    kind = "mlp"

    def __init__(self, group: AgentGroup, arch: dict[str, Any]):
        super().__init__()
        self.group = group
        self.arch = dict(arch)
        if group.image_shape is None:
            self.arch.pop("cnn", None)
        self.encoder = ImageEncoder(group, self.arch["cnn"], "student.cnn") if self.arch.get("cnn") else None
        act = activation(arch["activation"])
        layers: list[nn.Module] = []
        width = group.obs_dim if self.encoder is None else self.encoder.features_dim
        for h in arch["hidden_sizes"]:
            layers += [nn.Linear(width, h), act()]
            width = h
        layers.append(nn.Linear(width, group.act_dim))
        self.net = nn.Sequential(*layers)
        self._log_std = None if group.discrete else nn.Parameter(torch.zeros(group.act_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs if self.encoder is None else self.encoder(obs))

    def log_std(self) -> torch.Tensor | None:
        return self._log_std

    @classmethod
    def from_arch(cls, group: AgentGroup, arch: dict[str, Any]) -> MLPPolicy:
        return cls(group, arch)
