"""Hand-built relay teams for the cascade tests: each agent copies the symbol it observes (the relay optimum)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from envs.relay import RelayEnv
from madistill.envs.factory import EnvSpec
from madistill.envs.groups import AgentGroup
from madistill.envs.vector import MultiAgentVecEnv
from madistill.normalize import ObsNormalizer
from madistill.policies.base import Policy, TeamPolicy


class CopyPolicy(Policy):
    """Logits = ``scale`` x the sum of the one-hot blocks it observes: it emits the symbol it sees (the target
    for a source, the in-neighbours' last symbols otherwise), uniform when it sees none."""

    def __init__(self, group: AgentGroup, n_symbols: int, scale: float = 3.0):
        super().__init__()
        self.group, self.k, self.scale = group, n_symbols, scale
        self._anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # makes the device visible

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.scale * obs.reshape(obs.shape[0], -1, self.k).sum(1)


def relay_spec(**kwargs: object) -> EnvSpec:
    """The relay env with 3 symbols, no target switches unless given, 12 steps."""
    return EnvSpec("envs.relay.parallel_env", {"n_symbols": 3, "switch_prob": 0.0, "max_cycles": 12, **kwargs},
                   name="relay")


def copy_team(venv: MultiAgentVecEnv, scale: float = 3.0) -> TeamPolicy:
    """A CopyPolicy per group of ``venv`` (a relay env), normalisation off."""
    k = int(venv.groups[0].action_space.n)
    return TeamPolicy(venv.groups, {g.name: CopyPolicy(g, k, scale) for g in venv.groups},
                      {g.name: ObsNormalizer(g.obs_dim, enabled=False) for g in venv.groups})


def mlp_team(venv: MultiAgentVecEnv, hidden: list[int], seed: int = 0) -> TeamPolicy:
    """Randomly initialised tanh MLPs (torch seeded with ``seed``), one per group of ``venv``, normalisation off."""
    from madistill.policies.mlp import MLPPolicy

    torch.manual_seed(seed)
    return TeamPolicy(venv.groups, {g.name: MLPPolicy(g, {"hidden_sizes": hidden, "activation": "tanh"}) for g in venv.groups},
                      {g.name: ObsNormalizer(g.obs_dim, enabled=False) for g in venv.groups})


class UnseededRelay(RelayEnv):
    """A relay env that ignores the reset seed: its episodes cannot be replayed."""

    def reset(self, seed: int | None = None, options: dict | None = None):
        return super().reset(seed=None, options=options)


def venv_maker(spec: EnvSpec) -> Callable[[int, int], MultiAgentVecEnv]:
    """The paired runner's vector env factory for ``spec``, copies in this process."""
    return lambda n, period: MultiAgentVecEnv(spec, n, seed_period=period)
