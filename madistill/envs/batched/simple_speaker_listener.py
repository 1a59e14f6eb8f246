"""mpe2's simple_speaker_listener_v4, batched: a speaker names the goal landmark, a listener goes there."""

from __future__ import annotations

import numpy as np

from madistill.envs.batched.physics import WorldLayout
from madistill.envs.batched.scenario import BatchedScenario

N_LANDMARKS = 3
# mpe2's landmark colours; the speaker observes its goal landmark's
LANDMARK_COLORS = np.array([[0.65, 0.15, 0.15], [0.15, 0.65, 0.15], [0.15, 0.15, 0.65]])


class SimpleSpeakerListener(BatchedScenario):
    """``mpe2.simple_speaker_listener_v4`` with every argument. Agent 0 speaks and cannot move; agent 1
    moves and is silent."""

    modelled = ("max_cycles", "continuous_actions", "dynamic_rescaling", "benchmark_data")
    agents = ("speaker_0", "listener_0")
    n_goals, goal_choices = 1, N_LANDMARKS  # the landmark the listener must reach
    state = ("goal",)  # per copy: the goal landmark reset_world drew

    def __init__(self, n_copies: int, max_cycles: int = 25, continuous_actions: bool = False,
                 **_render_only: object):
        """``dynamic_rescaling`` and ``benchmark_data`` only change rendering and infos, which no stage reads."""
        super().__init__(n_copies, max_cycles, continuous_actions)
        self.goal = np.zeros(n_copies, dtype=np.int64)  # the landmark the listener must reach
        self._make_world(WorldLayout(
            n_agents=2, sizes=(0.075, 0.075) + (0.04,) * N_LANDMARKS, movable=(False, True) + (False,) * N_LANDMARKS,
            collide=(False,) * (2 + N_LANDMARKS), silent=(False, True), dim_c=3,
        ))

    def _place(self, idx: np.ndarray, goals: np.ndarray, pos: np.ndarray) -> None:
        self.goal[idx] = goals[:, 0]
        super()._place(idx, goals, pos)

    def rewards(self) -> np.ndarray:
        pos = self.world.pos
        sq = np.square(pos[:, 1] - pos[np.arange(self.n_copies), 2 + self.goal])
        shared = -(sq[:, 0] + sq[:, 1])  # the listener's squared distance to the goal, for both agents
        return np.stack([shared, shared], axis=1)

    def observations(self, idx: np.ndarray | slice) -> list[np.ndarray]:
        """Speaker: the goal's colour. Listener: ``[self_vel, landmark_rel_positions, speaker's comm]``."""
        w = self.world
        pos = w.pos[idx]
        rel = (pos[:, 2:] - pos[:, 1:2]).reshape(len(pos), -1)
        return [LANDMARK_COLORS[self.goal[idx]], np.concatenate([w.vel[idx, 1], rel, w.c[idx, 0]], axis=1)]
