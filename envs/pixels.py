"""Pixels: a PettingZoo ParallelEnv whose agents observe small RGB images (``pixels_v0``).

Every step each agent sees its own ``size x size x 3`` uint8 image: a dark, noisy background with one bright
square of a random colour at a random place. It says on which half the square lies (action 0: left,
1: right) and is rewarded 1 when right, 0 otherwise; a new image follows each step, and episodes end by
truncation after ``max_cycles`` steps. A policy that reads the image earns ``max_cycles`` per agent and
episode, a random one half of that: the smallest task on which an image encoder has to learn something.

Example::

    from envs import pixels
    env = pixels.parallel_env(size=36)
    obs, infos = env.reset(seed=0)   # obs["looker_0"].shape == (36, 36, 3), dtype uint8
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from pettingzoo import ParallelEnv
from pettingzoo.utils.conversions import parallel_to_aec

from envs.steps import truncating_step


class PixelsEnv(ParallelEnv):
    """Pixels ParallelEnv (``pixels_v0``).

    Args:
        n_agents: number of agents, named ``looker_0 .. looker_{n_agents-1}``.
        size: image height and width in pixels (at least 6).
        square: side of the bright square in pixels (at most ``size // 2``).
        max_cycles: episode length in steps.
    """

    metadata = {"name": "pixels_v0", "is_parallelizable": True, "render_modes": []}

    def __init__(self, n_agents: int = 2, size: int = 36, square: int = 8, max_cycles: int = 25):
        if size < 6 or not 1 <= square <= size // 2:
            raise ValueError(f"pixels needs size >= 6 and 1 <= square <= size // 2, got size={size}, square={square}")
        self.size, self.square, self.max_cycles = int(size), int(square), int(max_cycles)
        self.possible_agents = [f"looker_{i}" for i in range(int(n_agents))]
        self.agents: list[str] = []
        self._obs_space = spaces.Box(0, 255, (self.size, self.size, 3), dtype=np.uint8)
        self._act_space = spaces.Discrete(2)
        self._np_random = np.random.default_rng()
        self.sides: dict[str, int] = {}
        self.num_steps = 0

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._act_space

    def _image(self, agent: str) -> np.ndarray:
        """A fresh image for ``agent``; remembers on which half its square lies."""
        rng, n, s = self._np_random, self.size, self.square
        side = int(rng.integers(2))
        half = n // 2
        x = int(rng.integers(0, half - s + 1)) + side * (n - half)
        y = int(rng.integers(0, n - s + 1))
        img = rng.integers(0, 40, (n, n, 3), dtype=np.uint8)
        img[y : y + s, x : x + s] = rng.integers(150, 256, 3, dtype=np.uint8)
        self.sides[agent] = side
        return img

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._np_random, _ = seeding.np_random(seed)
        self.agents = list(self.possible_agents)
        self.num_steps = 0
        return {a: self._image(a) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions: dict[str, int]):
        rewards = {a: float(int(actions[a]) == self.sides[a]) for a in self.agents}
        self.num_steps += 1
        obs = {a: self._image(a) for a in self.agents}
        return truncating_step(self, obs, rewards, self.num_steps >= self.max_cycles)

    def close(self) -> None:
        pass


def parallel_env(**kwargs) -> PixelsEnv:
    """Create the ``pixels_v0`` ParallelEnv; kwargs go to :class:`PixelsEnv`."""
    return PixelsEnv(**kwargs)


def env(**kwargs):
    """AEC version of ``pixels_v0`` via ``pettingzoo.utils.conversions.parallel_to_aec``."""
    return parallel_to_aec(parallel_env(**kwargs))
