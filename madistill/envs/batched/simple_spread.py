"""mpe2's simple_spread_v3, batched: N agents cover N landmarks, penalised for collisions."""

from __future__ import annotations

import numpy as np

from madistill.envs.batched.physics import WorldLayout
from madistill.envs.batched.scenario import BatchedScenario

AGENT_SIZE = 0.15
LANDMARK_SIZE = 0.050  # mpe2's default entity size
CAPTURE_RADIUS = 0.1  # terminate_on_success: every landmark has an agent closer than this


class SimpleSpread(BatchedScenario):
    """``mpe2.simple_spread_v3`` with every argument but partial observability (``num_*_neighbors``).

    ``curriculum=True`` plays curriculum stage 0 (no collision penalty), where mpe2 starts and stays
    unless ``advance_curriculum`` is called on the env, which the vector env never does.
    """

    modelled = ("N", "local_ratio", "max_cycles", "continuous_actions", "dynamic_rescaling", "benchmark_data",
                "curriculum", "terminate_on_success")

    def __init__(self, n_copies: int, N: int = 3, local_ratio: float = 0.5, max_cycles: int = 25,  # noqa: N803
                 continuous_actions: bool = False, curriculum: bool = False, terminate_on_success: bool = False,
                 **_render_only: object):
        """``dynamic_rescaling`` and ``benchmark_data`` only change rendering and infos, which no stage reads."""
        super().__init__(n_copies, max_cycles, continuous_actions)
        self.n = N
        self.agents = tuple(f"agent_{i}" for i in range(N))
        self.local_ratio = local_ratio
        self.collision_penalty = not curriculum
        self.terminate_on_success = terminate_on_success
        self._make_world(WorldLayout(
            n_agents=N, sizes=(AGENT_SIZE,) * N + (LANDMARK_SIZE,) * N, movable=(True,) * N + (False,) * N,
            collide=(True,) * N + (False,) * N, silent=(True,) * N, dim_c=2,
        ))

    def _min_landmark_distances(self) -> np.ndarray:
        """``[copies, landmarks]``: each landmark's distance to its closest agent."""
        w, n = self.world, self.n
        return np.stack([np.min([w.distances(a, n + m) for a in range(n)], axis=0) for m in range(n)], axis=1)

    def rewards(self) -> np.ndarray:
        w, n = self.world, self.n
        global_reward = np.zeros(self.n_copies)
        for d in self._min_landmark_distances().T:  # mpe2 subtracts landmark by landmark
            global_reward -= d
        collisions = np.zeros((self.n_copies, n))
        if self.collision_penalty:
            dist_min = AGENT_SIZE + AGENT_SIZE
            for a in range(n):
                for b in range(a + 1, n):
                    hit = w.distances(a, b) < dist_min
                    collisions[:, a] -= hit
                    collisions[:, b] -= hit
        return self.blend(global_reward, collisions, self.local_ratio)

    def terminal(self) -> np.ndarray:
        if not self.terminate_on_success:
            return super().terminal()
        return (self._min_landmark_distances() < CAPTURE_RADIUS).all(axis=1)

    def observations(self, idx: np.ndarray | slice) -> list[np.ndarray]:
        """``[self_vel, self_pos, landmark_rel_positions, other_agent_rel_positions, other_agents' comm]``."""
        w, n = self.world, self.n
        pos, vel, c = w.pos[idx], w.vel[idx], w.c[idx]
        out = []
        for i in range(n):
            rel = pos - pos[:, i: i + 1]  # every entity relative to agent i
            others = [o for o in range(n) if o != i]
            out.append(np.concatenate(
                [vel[:, i], pos[:, i], rel[:, n:].reshape(len(pos), -1), rel[:, others].reshape(len(pos), -1),
                 c[:, others].reshape(len(pos), -1)], axis=1))
        return out
