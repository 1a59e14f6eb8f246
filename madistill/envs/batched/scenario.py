"""What a batched port of an mpe2 scenario provides, and the per-copy seeded reset they share."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.utils import seeding

from madistill.envs.batched.physics import BatchedWorld, WorldLayout
from madistill.envs.batched.seeding import bounded, pcg64_outputs, uniform


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
    state: tuple[str, ...] = ()  # per-copy scenario arrays besides the world's (goals): what a state copy copies
    n_goals = 0  # goals reset_world draws (integers(goal_choices) each) before the positions
    goal_choices = 1

    def __init__(self, n_copies: int, max_cycles: int = 25, continuous_actions: bool = False):
        self.n_copies = n_copies
        self.max_cycles = max_cycles
        self.continuous = continuous_actions
        self.world: BatchedWorld

    @classmethod
    def unported(cls, kwargs: dict[str, Any]) -> list[str]:
        """The constructor arguments in ``kwargs`` whose values the port does not model."""
        return sorted(k for k, v in kwargs.items() if k not in cls.modelled and v is not None)

    def copy_from(self, other: BatchedScenario, rows: np.ndarray) -> None:
        """This scenario's copies become copies ``rows`` of ``other`` (the same port and arguments), mid-episode:
        the state copy env branching uses instead of replaying an episode from its seed."""
        for name in BatchedWorld.STATE:
            getattr(self.world, name)[...] = getattr(other.world, name)[rows]
        for name in self.state:
            getattr(self, name)[...] = getattr(other, name)[rows]

    def _make_world(self, layout: WorldLayout) -> None:
        self.world = BatchedWorld(layout, self.n_copies)

    def position_draws(self) -> list[tuple[np.ndarray, float, float]]:
        """``(entities, low, high)`` of ``reset_world``'s successive ``uniform(low, high, 2)`` draws per entity,
        in order; an entity drawn again takes the later draw. Most scenarios draw every entity in [-1, 1]."""
        return [(np.arange(self.world.layout.n_entities), -1.0, 1.0)]

    def reset_copies(self, idx: np.ndarray, seeds: np.ndarray) -> None:
        """Start copies ``idx``' episodes of ``seeds`` with mpe2's ``reset_world`` draws: first ``n_goals``
        ``integers(goal_choices)``, then the ``position_draws``, from the generator mpe2's ``reset(seed=...)``
        seeds. Drawn for all seeds at once (``seeding``), except for copies that cannot be drawn that way (a
        negative seed, a bounded draw numpy would reject): those get numpy's generator."""
        seeds = np.asarray(seeds, dtype=np.int64)
        idx = np.asarray(idx)
        fast = seeds >= 0
        draws = self.position_draws()
        n_doubles = sum(2 * len(entities) for entities, _, _ in draws)
        out = pcg64_outputs(seeds[fast].astype(np.uint64), int(self.n_goals > 0) + n_doubles)
        if self.n_goals:
            # integers() takes 32-bit draws: both halves of the first output; the doubles start after it
            halves = [out[:, 0] & np.uint64(0xFFFFFFFF), out[:, 0] >> np.uint64(32)][: self.n_goals]
            goals, rejected = bounded(np.stack(halves, axis=1), self.goal_choices)
            keep = ~rejected.any(axis=1)
            fast[fast] = keep
            out, goals = out[keep], goals[keep]
            doubles = out[:, 1:]
        else:
            goals, doubles = np.zeros((len(out), 0), dtype=np.int64), out
        pos = np.empty((len(out), self.world.layout.n_entities, 2))
        k = 0
        for entities, low, high in draws:
            pos[:, entities] = uniform(doubles[:, k: k + 2 * len(entities)], low, high).reshape(len(out), len(entities), 2)
            k += 2 * len(entities)
        self._place(idx[fast], goals, pos)
        for i, seed in zip(idx[~fast], seeds[~fast]):
            self._draw(int(i), seeding.np_random(int(seed))[0])

    def _draw(self, i: int, rng: np.random.Generator) -> None:
        """Copy ``i``'s ``reset_world`` draws from numpy's generator ``rng``. Consecutive ``uniform(low, high, 2)``
        calls draw the same numbers as one ``uniform(low, high, (n, 2))``."""
        goals = [int(rng.integers(self.goal_choices)) for _ in range(self.n_goals)]
        pos = np.empty((self.world.layout.n_entities, 2))
        for entities, low, high in self.position_draws():
            pos[entities] = rng.uniform(low, high, (len(entities), 2))
        self._place(np.array([i]), np.array([goals], dtype=np.int64).reshape(1, self.n_goals), pos[None])

    def _place(self, idx: np.ndarray, goals: np.ndarray, pos: np.ndarray) -> None:
        """Copies ``idx`` start with goals ``goals`` [copies, n_goals] and entity positions ``pos``
        [copies, entities, 2], at rest and silent."""
        self.world.reset_copies(idx, pos)

    def step(self, actions: list[np.ndarray]) -> np.ndarray:
        """Apply every agent's actions (agent order), step the worlds; ``[copies, agents]`` float64 rewards."""
        self.world.set_actions(actions, self.continuous)
        self.world.step()
        return self.rewards()

    def rewards(self) -> np.ndarray:
        """``[copies, agents]`` float64: each agent's reward after the step, as mpe2's SimpleEnv forms it."""
        raise NotImplementedError

    def observations(self, idx: np.ndarray | slice) -> list[np.ndarray]:
        """Each agent's ``[len(idx), obs_dim]`` observation in copies ``idx``, computed in float64 as mpe2 does
        (and returned as float64 or already as float32, mpe2's type for observations)."""
        raise NotImplementedError

    def terminal(self) -> np.ndarray:
        """``[copies]``: the scenario's ``is_terminal`` (the episode ended early on success)."""
        return np.zeros(self.n_copies, dtype=bool)

    @staticmethod
    def blend(global_reward: np.ndarray, agent_rewards: np.ndarray, local_ratio: float) -> np.ndarray:
        """SimpleEnv's ``global * (1 - local_ratio) + agent * local_ratio`` (``[copies]``, ``[copies, agents]``)."""
        return global_reward[:, None] * (1 - local_ratio) + agent_rewards * local_ratio
