"""Agent groups: agents with equal observation and action spaces share one policy."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first

from madistill.errors import MadistillError


@dataclass(frozen=True)
class AgentGroup:
    """Agents that share a policy.

    ``observation_space`` is the env's space for these agents; policies see it flattened
    (``obs_dim`` features, float32; Discrete as one-hot), see :func:`flatten_obs`. Image observations
    (see :attr:`image_shape`) are flattened too and reshaped into images by the policies' CNN encoders.
    """

    name: str
    agents: tuple[str, ...]
    observation_space: gym.Space
    action_space: gym.Space

    @property
    def obs_dim(self) -> int:
        return int(spaces.flatdim(self.observation_space))

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """``(channels, height, width)`` when the observations are images by SB3's convention (a uint8 Box of
        three dimensions with bounds 0 and 255, channels last or, when that axis is the smallest, first);
        None otherwise."""
        space = self.observation_space
        if not is_image_space(space, check_channels=False):
            return None
        if is_image_space_channels_first(space):
            c, h, w = space.shape
        else:
            h, w, c = space.shape
        return int(c), int(h), int(w)

    @property
    def channels_first(self) -> bool:
        """Whether an image group's flattened observations are in (C, H, W) order rather than (H, W, C)."""
        return self.image_shape is not None and is_image_space_channels_first(self.observation_space)

    @property
    def n_agents(self) -> int:
        return len(self.agents)

    @property
    def discrete(self) -> bool:
        return isinstance(self.action_space, spaces.Discrete)

    @property
    def act_dim(self) -> int:
        """Number of logits (Discrete) or action components (Box)."""
        if isinstance(self.action_space, spaces.Discrete):
            return int(self.action_space.n)
        return int(np.prod(self.action_space.shape))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "agents": list(self.agents),
            "observation_space": space_to_dict(self.observation_space),
            "action_space": space_to_dict(self.action_space),
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AgentGroup:
        return AgentGroup(
            name=d["name"],
            agents=tuple(d["agents"]),
            observation_space=space_from_dict(d["observation_space"]),
            action_space=space_from_dict(d["action_space"]),
        )


def check_supported(agent: str, obs_space: gym.Space, act_space: gym.Space) -> None:
    """Fail early, naming the fix, on spaces a policy cannot consume or emit."""
    if not isinstance(obs_space, (spaces.Box, spaces.Discrete, spaces.MultiBinary, spaces.MultiDiscrete)):
        raise MadistillError(
            f"agent {agent!r} has observation space {obs_space}, which madistill cannot flatten; "
            "wrap the env so observations are a Box (any shape) or Discrete"
        )
    if not isinstance(act_space, (spaces.Discrete, spaces.Box)):
        raise MadistillError(
            f"agent {agent!r} has action space {act_space}; madistill supports Discrete and Box actions: "
            "wrap the env to expose one of them"
        )
    if isinstance(act_space, spaces.Discrete) and int(act_space.start) != 0:
        raise MadistillError(
            f"agent {agent!r} has action space {act_space}; policies emit actions 0..n-1: wrap the env so its "
            "Discrete actions start at 0"
        )


def _base_name(agent: str) -> str:
    # "speaker_0" -> "speaker", "agent_12" -> "agent": names that differ only by index share a stem.
    return re.sub(r"[_\-]?\d+$", "", agent) or agent


def group_agents(env: Any, mode: str = "auto") -> list[AgentGroup]:
    """Partition ``env.possible_agents`` into groups.

    ``mode="auto"``: agents with equal (observation, action) spaces form one group, named after the
    agents' common stem (``agent_0, agent_1 -> "agent"``). ``mode="per_agent"``: every agent alone.
    """
    if mode not in ("auto", "per_agent"):
        raise MadistillError(f"unknown grouping {mode!r}: use env.grouping=auto or env.grouping=per_agent")
    buckets: list[tuple[gym.Space, gym.Space, list[str]]] = []
    for agent in env.possible_agents:
        o, a = env.observation_space(agent), env.action_space(agent)
        check_supported(agent, o, a)
        if mode == "auto":
            for bo, ba, members in buckets:
                if bo == o and ba == a:
                    members.append(agent)
                    break
            else:
                buckets.append((o, a, [agent]))
        else:
            buckets.append((o, a, [agent]))
    groups, used = [], set()
    for o, a, members in buckets:
        stems = {_base_name(m) for m in members}
        name = stems.pop() if mode == "auto" and len(stems) == 1 else members[0]
        if name in used:  # two groups with the same stem but different spaces
            name = members[0]
        used.add(name)
        groups.append(AgentGroup(name=name, agents=tuple(members), observation_space=o, action_space=a))
    return groups


def flatten_obs(space: gym.Space, obs: Any) -> np.ndarray:
    """One agent's observation as a flat float32 vector (Discrete becomes one-hot)."""
    return np.asarray(spaces.flatten(space, obs), dtype=np.float32)


def _bound(x: np.ndarray) -> Any:
    # JSON has no inf: keep bounds as a scalar when uniform, with infinities as strings.
    vals = np.unique(x)
    conv = [("inf" if v == np.inf else "-inf" if v == -np.inf else float(v)) for v in x.ravel()]
    if len(vals) == 1:
        return conv[0]
    return conv


def _unbound(v: Any, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.array([float(x) for x in (v if isinstance(v, list) else [v])], dtype=np.float64)
    return np.broadcast_to(arr, shape).copy() if arr.size == 1 else arr.reshape(shape)


def space_to_dict(space: gym.Space) -> dict[str, Any]:
    """A JSON description of a space, enough to rebuild and compare it (no pickling)."""
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "dtype": str(space.dtype),
            "low": _bound(space.low),
            "high": _bound(space.high),
        }
    if isinstance(space, spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist()}
    raise MadistillError(f"cannot describe space {space} in a manifest; use Box or Discrete spaces")


def space_from_dict(d: dict[str, Any]) -> gym.Space:
    """Rebuild a gymnasium space from its manifest form (the inverse of ``space_to_dict``)."""
    kind = d.get("type")
    if kind == "Discrete":
        return spaces.Discrete(d["n"], start=d.get("start", 0))
    if kind == "Box":
        shape, dtype = tuple(d["shape"]), np.dtype(d["dtype"])
        low, high = _unbound(d["low"], shape).astype(dtype), _unbound(d["high"], shape).astype(dtype)
        return spaces.Box(low, high, shape=shape, dtype=dtype)
    if kind == "MultiBinary":
        return spaces.MultiBinary(d["n"])
    if kind == "MultiDiscrete":
        return spaces.MultiDiscrete(d["nvec"])
    raise MadistillError(f"manifest names an unknown space type {kind!r}: the policy file is corrupt or newer")
