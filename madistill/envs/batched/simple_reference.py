"""mpe2's simple_reference_v3, batched: two agents each guide the other to a landmark only they know."""

from __future__ import annotations

import numpy as np

from madistill.envs.batched.physics import WorldLayout
from madistill.envs.batched.scenario import BatchedScenario

N_LANDMARKS = 3
# mpe2's landmark colours; each agent observes the colour of the landmark its partner must reach
LANDMARK_COLORS = np.array([[0.75, 0.25, 0.25], [0.25, 0.75, 0.25], [0.25, 0.25, 0.75]])
SIZE = 0.050  # mpe2's default entity size


class SimpleReference(BatchedScenario):
    """``mpe2.simple_reference_v3`` with every argument. Both agents move and speak (10 words)."""

    modelled = ("local_ratio", "max_cycles", "continuous_actions", "dynamic_rescaling", "benchmark_data")
    agents = ("agent_0", "agent_1")
    n_goals, goal_choices = 2, N_LANDMARKS  # both agents' goals: the landmark its partner must reach
    state = ("goal",)  # per copy: the goal landmark reset_world drew

    def __init__(self, n_copies: int, local_ratio: float = 0.5, max_cycles: int = 25,
                 continuous_actions: bool = False, **_render_only: object):
        """``dynamic_rescaling`` and ``benchmark_data`` only change rendering and infos, which no stage reads."""
        super().__init__(n_copies, max_cycles, continuous_actions)
        self.local_ratio = local_ratio
        self.goal = np.zeros((n_copies, 2), dtype=np.int64)  # per agent: the landmark its partner must reach
        self._make_world(WorldLayout(
            n_agents=2, sizes=(SIZE,) * (2 + N_LANDMARKS), movable=(True, True) + (False,) * N_LANDMARKS,
            collide=(False,) * (2 + N_LANDMARKS), silent=(False, False), dim_c=10,
        ))

    def _place(self, idx: np.ndarray, goals: np.ndarray, pos: np.ndarray) -> None:
        self.goal[idx] = goals
        super()._place(idx, goals, pos)

    def rewards(self) -> np.ndarray:
        pos, rows = self.world.pos, np.arange(self.n_copies)
        agent_rewards = np.empty((self.n_copies, 2))
        for a in range(2):
            sq = np.square(pos[:, 1 - a] - pos[rows, 2 + self.goal[:, a]])
            agent_rewards[:, a] = -np.sqrt(sq[:, 0] + sq[:, 1])
        global_reward = (agent_rewards[:, 0] + agent_rewards[:, 1]) / 2  # mpe2's mean over agents
        return self.blend(global_reward, agent_rewards, self.local_ratio)

    def observations(self, idx: np.ndarray | slice) -> list[np.ndarray]:
        """``[self_vel, landmark_rel_positions, partner's goal colour, partner's comm]``."""
        w = self.world
        pos, n = w.pos[idx], len(w.pos[idx])
        return [np.concatenate([w.vel[idx, a], (pos[:, 2:] - pos[:, a: a + 1]).reshape(n, -1),
                                LANDMARK_COLORS[self.goal[idx, a]], w.c[idx, 1 - a]], axis=1) for a in range(2)]
