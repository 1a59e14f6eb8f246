"""What a batched port of an mpe2 scenario provides, and the per-copy seeded reset they share."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.utils import seeding

from madistill.envs.batched.physics import BatchedWorld, WorldLayout


class BatchedScenario:
    """One mpe2 scenario for ``n_copies`` env copies: its world, per-copy scenario state (goals), rewards,
    observations and termination, each computed as the mpe2 scenario computes it for one copy.

    Subclasses set ``agents`` (mpe2's agent names, in mpe2's order) and build ``self.world``; they take the
    scenario's constructor arguments as keywords, with mpe2's defaults.
    """

    agents: tuple[str, ...]
    # Constructor arguments the port models at any value; the others it takes only as None, mpe2's default
    # for each of them (``render_mode`` included: rendering uses the PettingZoo backend).
    modelled: tuple[str, ...] = ()

    def __init__(self, n_copies: int, max_cycles: int = 25, continuous_actions: bool = False):
        self.n_copies = n_copies
        self.max_cycles = max_cycles
        self.continuous = continuous_actions
        self.world: BatchedWorld

    @classmethod
    def unported(cls, kwargs: dict[str, Any]) -> list[str]:
        """The constructor arguments in ``kwargs`` whose values the port does not model."""
        return sorted(k for k, v in kwargs.items() if k not in cls.modelled and v is not None)

    def _make_world(self, layout: WorldLayout) -> None:
        self.world = BatchedWorld(layout, self.n_copies)

    def reset_copy(self, i: int, seed: int) -> None:
        """Start copy ``i``'s episode of seed ``seed``, drawing from a generator seeded as mpe2's
        ``reset(seed=...)`` seeds its ``np_random``, in the order of the scenario's ``reset_world``."""
        rng, _ = seeding.np_random(seed)
        self._draw(i, rng)

    def _draw(self, i: int, rng: np.random.Generator) -> None:
        """The scenario's ``reset_world`` draws for copy ``i``. Consecutive ``uniform(-1, 1, 2)`` calls
        draw the same numbers as one ``uniform(-1, 1, (n, 2))``."""
        self.world.reset_copy(i, rng.uniform(-1, +1, (self.world.layout.n_entities, 2)))

    def step(self, actions: list[np.ndarray]) -> np.ndarray:
        """Apply every agent's actions (agent order), step the worlds; ``[copies, agents]`` float64 rewards."""
        self.world.set_actions(actions, self.continuous)
        self.world.step()
        return self.rewards()

    def rewards(self) -> np.ndarray:
        """``[copies, agents]`` float64: each agent's reward after the step, as mpe2's SimpleEnv forms it."""
        raise NotImplementedError

    def observations(self, idx: np.ndarray | slice) -> list[np.ndarray]:
        """Each agent's ``[len(idx), obs_dim]`` float64 observation in copies ``idx``."""
        raise NotImplementedError

    def terminal(self) -> np.ndarray:
        """``[copies]``: the scenario's ``is_terminal`` (the episode ended early on success)."""
        return np.zeros(self.n_copies, dtype=bool)

    @staticmethod
    def blend(global_reward: np.ndarray, agent_rewards: np.ndarray, local_ratio: float) -> np.ndarray:
        """SimpleEnv's ``global * (1 - local_ratio) + agent * local_ratio`` (``[copies]``, ``[copies, agents]``)."""
        return global_reward[:, None] * (1 - local_ratio) + agent_rewards * local_ratio
