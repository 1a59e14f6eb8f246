"""The end of a step shared by the project's envs, whose episodes end only by truncation after a fixed number
of steps."""

from __future__ import annotations

from typing import Any

from pettingzoo import ParallelEnv


def truncating_step(env: ParallelEnv, obs: dict[str, Any], rewards: dict[str, float], done: bool) -> tuple:
    """PettingZoo's ``(obs, rewards, terminations, truncations, infos)`` of one step of ``env``'s live agents:
    nobody terminates, every agent is truncated when ``done``, infos are empty; ``done`` also empties
    ``env.agents``, as PettingZoo expects of an ended episode."""
    agents = env.agents
    out = obs, rewards, {a: False for a in agents}, {a: done for a in agents}, {a: {} for a in agents}
    if done:
        env.agents = []
    return out
