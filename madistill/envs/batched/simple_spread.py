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
        self._others = np.array([[o for o in range(N) if o != i] for i in range(N)]).reshape(N, N - 1)
        self._obs_dim = 4 + 2 * N + 2 * (N - 1) + 2 * (N - 1)  # vel, pos, landmarks, others, others' comm
        self._make_world(WorldLayout(
            n_agents=N, sizes=(AGENT_SIZE,) * N + (LANDMARK_SIZE,) * N, movable=(True,) * N + (False,) * N,
            collide=(True,) * N + (False,) * N, silent=(True,) * N, dim_c=2,
        ))

    def _min_landmark_distances(self) -> np.ndarray:
        """``[copies, landmarks]``: each landmark's distance to its closest agent."""
        n = self.n
        return self.world.distances(slice(0, n), slice(n, 2 * n)).min(axis=1)

    def rewards(self) -> np.ndarray:
        n = self.n
        global_reward = np.zeros(self.n_copies)
        for d in self._min_landmark_distances().T:  # mpe2 subtracts landmark by landmark
            global_reward -= d
        collisions = np.zeros((self.n_copies, n))
        if self.collision_penalty:
            hit = self.world.distances(slice(0, n), slice(0, n)) < AGENT_SIZE + AGENT_SIZE
            hit[:, np.arange(n), np.arange(n)] = False  # an agent does not collide with itself
            collisions = 0.0 - hit.sum(axis=2)  # mpe2 counts down from 0: no collision is +0.0
        return self.blend(global_reward, collisions, self.local_ratio)

    def terminal(self) -> np.ndarray:
        if not self.terminate_on_success:
            return super().terminal()
        return (self._min_landmark_distances() < CAPTURE_RADIUS).all(axis=1)

    def observations(self, idx: np.ndarray | slice) -> list[np.ndarray]:
        """``[self_vel, self_pos, landmark_rel_positions, other_agent_rel_positions, other_agents' comm]``."""
        w, n = self.world, self.n
        pos = w.pos[idx]
        b = len(pos)
        obs = np.empty((b, n, self._obs_dim), dtype=np.float32)  # float32, as mpe2 returns them
        obs[:, :, 0:2] = w.vel[idx, :n]
        obs[:, :, 2:4] = pos[:, :n]
        for m in range(n):  # landmarks relative to every agent
            obs[:, :, 4 + 2 * m: 6 + 2 * m] = pos[:, n + m: n + m + 1] - pos[:, :n]
        for i in range(n):  # the other agents relative to agent i, in agent order
            for slot, o in enumerate(self._others[i]):
                obs[:, i, 4 + 2 * n + 2 * slot: 6 + 2 * n + 2 * slot] = pos[:, o] - pos[:, i]
        comm = 4 + 4 * n - 2
        for i in range(n):
            obs[:, i, comm:] = w.c[idx][:, self._others[i]].reshape(b, -1)
        return list(obs.transpose(1, 0, 2))
