"""mpe2's simple_adversary_v3, batched: N good agents know the goal landmark and lure an adversary away."""

from __future__ import annotations

import numpy as np

from madistill.envs.batched.physics import WorldLayout
from madistill.envs.batched.scenario import BatchedScenario

AGENT_SIZE = 0.15
LANDMARK_SIZE = 0.08


class SimpleAdversary(BatchedScenario):
    """``mpe2.simple_adversary_v3`` with every argument but partial observability (``num_*_neighbors``).
    Agent 0 is the adversary; agents 1..N are the good agents; N landmarks, one of them the goal."""

    modelled = ("N", "max_cycles", "continuous_actions", "dynamic_rescaling", "benchmark_data")
    n_goals = 1  # the goal landmark
    state = ("goal",)  # per copy: the goal landmark reset_world drew

    def __init__(self, n_copies: int, N: int = 2, max_cycles: int = 25, continuous_actions: bool = False,  # noqa: N803
                 **_render_only: object):
        """``dynamic_rescaling`` and ``benchmark_data`` only change rendering and infos, which no stage reads."""
        super().__init__(n_copies, max_cycles, continuous_actions)
        self.n = N
        self.goal_choices = N
        self.agents = ("adversary_0", *(f"agent_{i}" for i in range(N)))
        self.goal = np.zeros(n_copies, dtype=np.int64)
        self._others = [[o for o in range(N + 1) if o != i] for i in range(N + 1)]
        self._make_world(WorldLayout(
            n_agents=N + 1, sizes=(AGENT_SIZE,) * (N + 1) + (LANDMARK_SIZE,) * N,
            movable=(True,) * (N + 1) + (False,) * N, collide=(False,) * (2 * N + 1), silent=(True,) * (N + 1),
            dim_c=2,
        ))

    def _place(self, idx: np.ndarray, goals: np.ndarray, pos: np.ndarray) -> None:
        self.goal[idx] = goals[:, 0]
        super()._place(idx, goals, pos)

    def rewards(self) -> np.ndarray:
        """Adversary: minus its distance to the goal. Good agents (all alike): minus the closest good agent's
        distance to the goal, plus the adversary's."""
        n, pos = self.n, self.world.pos
        goal = pos[np.arange(self.n_copies), n + 1 + self.goal]
        sq = np.square(pos[:, : n + 1] - goal[:, None])
        dist = np.sqrt(sq[..., 0] + sq[..., 1])  # [copies, agents] distance to the goal
        good = -dist[:, 1:].min(axis=1) + dist[:, 0]
        return np.concatenate([-dist[:, :1], np.repeat(good[:, None], n, axis=1)], axis=1)

    def observations(self, idx: np.ndarray | slice) -> list[np.ndarray]:
        """Adversary: ``[landmark_rel_positions, other_agent_rel_positions]``; good agents put the goal's
        relative position first."""
        n, pos = self.n, self.world.pos[idx]
        b = len(pos)
        goal = pos[np.arange(b), n + 1 + self.goal[idx]]
        out = []
        for i in range(n + 1):
            parts = [] if i == 0 else [goal - pos[:, i]]
            parts += [(pos[:, n + 1:] - pos[:, i: i + 1]).reshape(b, -1),
                      (pos[:, self._others[i]] - pos[:, i: i + 1]).reshape(b, -1)]
            out.append(np.concatenate(parts, axis=1))
        return out
