"""Duel: a small zero-sum PettingZoo ParallelEnv with two teams (sides), named as PettingZoo's MPE names them.

``n`` adversaries (``adversary_0..``) play against ``n`` good agents (``agent_0..``). Every step a hidden bit
is drawn; every agent picks an action in {0, 1}. Good agents observe the bit (one-hot); adversaries observe only
the share of the episode that has passed, so only the good team can learn to match the bit. With ``m_good`` and
``m_adv`` the shares of good agents and adversaries whose action equals the bit, every good agent gets
``m_good - m_adv`` and every adversary ``m_adv - m_good``: the two teams' returns are exact opposites, so the
mean over all agents is 0 in every episode, whoever plays well.

Example::

    from envs import duel
    env = duel.parallel_env(n=2, max_cycles=5)
    obs, infos = env.reset(seed=0)
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from envs.steps import truncating_step


class DuelEnv(ParallelEnv):
    """See the module docstring."""

    metadata = {"name": "duel_v0", "is_parallelizable": True, "render_modes": []}

    def __init__(self, n: int = 2, max_cycles: int = 5):
        if n < 1 or max_cycles < 1:
            raise ValueError(f"duel needs n >= 1 and max_cycles >= 1, got n={n}, max_cycles={max_cycles}")
        self.adversaries = [f"adversary_{i}" for i in range(n)]
        self.good = [f"agent_{i}" for i in range(n)]
        self.possible_agents = self.adversaries + self.good
        self.agents: list[str] = []
        self.max_cycles = max_cycles
        self._spaces = {a: spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32) for a in self.adversaries}
        self._spaces.update({a: spaces.Box(0.0, 1.0, shape=(2,), dtype=np.float32) for a in self.good})
        self._act_space = spaces.Discrete(2)  # one object, as PettingZoo's API test asks (space seeding)
        self._rng = np.random.default_rng()
        self.t, self.bit = 0, 0

    def observation_space(self, agent: str) -> spaces.Box:
        return self._spaces[agent]

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._act_space

    def _observe(self) -> dict[str, np.ndarray]:
        seen = np.eye(2, dtype=np.float32)[self.bit]
        elapsed = np.array([self.t / self.max_cycles], dtype=np.float32)
        return {a: (seen if a in self.good else elapsed) for a in self.agents}

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.agents, self.t = list(self.possible_agents), 0
        self.bit = int(self._rng.integers(2))
        return self._observe(), {a: {} for a in self.agents}

    def step(self, actions: dict[str, int]):
        m_good = float(np.mean([int(actions[a]) == self.bit for a in self.good]))
        m_adv = float(np.mean([int(actions[a]) == self.bit for a in self.adversaries]))
        rewards = {a: (m_good - m_adv if a in self.good else m_adv - m_good) for a in self.agents}
        self.t += 1
        self.bit = int(self._rng.integers(2))
        return truncating_step(self, self._observe(), rewards, self.t >= self.max_cycles)


def parallel_env(n: int = 2, max_cycles: int = 5) -> DuelEnv:
    """The Duel env (see the module docstring)."""
    return DuelEnv(n=n, max_cycles=max_cycles)
