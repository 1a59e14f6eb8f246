"""Acting from Python: a saved team that takes a PettingZoo env's raw observations (docs/python_api.md)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv

from madistill.envs.factory import EnvSpec, make_env
from madistill.envs.groups import flatten_obs
from madistill.errors import MadistillError
from madistill.policies import store
from madistill.policies.base import TeamPolicy
from madistill.rollout import env_actions, team_actions
from madistill.transforms import normalize


class Team:
    """A saved team of policies acting on the observation dicts of a PettingZoo parallel env.

    The policies were trained on flattened observations normalised by the statistics saved with them;
    :meth:`act` does both, as every madistill rollout does, so it takes what ``env.reset`` and ``env.step``
    return. ``policy`` is the underlying :class:`~madistill.policies.TeamPolicy` (normalised tensors in),
    ``manifest`` the saved manifest and ``env`` the spec of the env the team was saved for."""

    def __init__(self, policy: TeamPolicy, manifest: dict[str, Any]):
        self.policy = policy
        self.manifest = manifest
        self.env = EnvSpec.from_dict(manifest["env"])

    @property
    def agents(self) -> list[str]:
        """The agents the team has a policy for."""
        return list(self.policy.group_of)

    def make_env(self, render_mode: str | None = None) -> ParallelEnv:
        """A fresh copy of the env the team was saved for (its factory and keyword arguments)."""
        return make_env(self.env, render_mode=render_mode)

    def act(
        self, observations: Mapping[str, Any], deterministic: bool = True, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Actions ``{agent: action}`` for the agents in ``observations`` (``{agent: raw observation}``):
        an ``int`` for a Discrete action space, a float32 array within the bounds for a Box one. Greedy by
        default; ``deterministic=False`` samples, from ``generator`` where one is given (reproducible)."""
        unknown = sorted(set(observations) - set(self.policy.group_of))
        if unknown:
            raise MadistillError(f"the team has no policy for agents {unknown}: it acts for {self.agents} in env "
                                 f"{self.env.id!r} ({self.env.target} with {self.env.kwargs})")
        present = {g.name: [a for a in g.agents if a in observations] for g in self.policy.groups}
        raw = {g: np.stack([self._flat(g, a, observations[a]) for a in agents])[None]
               for g, agents in present.items() if agents}
        with torch.no_grad():
            _, chosen = team_actions(self.policy, normalize(self.policy, raw), deterministic, generator)
        arrays = env_actions(self.policy, chosen)
        out: dict[str, Any] = {}
        for g in self.policy.groups:
            for j, agent in enumerate(present[g.name]):
                out[agent] = int(arrays[g.name][0, j]) if g.discrete else arrays[g.name][0, j]
        return {a: out[a] for a in observations}

    def _flat(self, group: str, agent: str, obs: Any) -> np.ndarray:
        """``agent``'s observation flattened as in training; one-line errors for one that cannot be the env's."""
        space = self.policy[group].group.observation_space
        try:
            x = flatten_obs(space, obs)
        except (ValueError, IndexError, TypeError) as e:
            raise MadistillError(self._misfit(agent, space, str(e))) from e
        if x.size != spaces.flatdim(space):
            raise MadistillError(self._misfit(agent, space, f"it has {x.size} features"))
        if not np.isfinite(x).all():
            raise MadistillError(f"the observation of {agent!r} holds NaN/inf: the policy cannot act on it")
        return x

    def _misfit(self, agent: str, space: Any, why: str) -> str:
        return (f"the observation of {agent!r} does not fit the team's {space} ({why}): act in the env it was "
                f"saved for, {self.env.target} with {self.env.kwargs}")


def load_team(path: str | Path, device: str | torch.device = "cpu") -> Team:
    """Load a saved team from a policy directory, or a run directory holding one policy, to act from Python."""
    policy, manifest = store.load_team(path, device=device)
    policy.eval()
    return Team(policy, manifest)
