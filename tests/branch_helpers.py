"""A constructed env whose most harmful action is known by hand, and a linear team for it."""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv

from madistill.envs.factory import EnvSpec
from madistill.envs.groups import AgentGroup
from madistill.envs.vector import MultiAgentVecEnv
from madistill.normalize import ObsNormalizer
from madistill.policies.base import Policy, TeamPolicy

COST = (0.0, 0.0, 5.0, 1.0)  # what each action costs every agent at once
TRAP = 10.0  # action 3 also costs every agent this much at the next step


class TrapEnv(ParallelEnv):
    """Two agents, four actions, a shared reward: ``-(COST[a_0] + COST[a_1]) - TRAP * armed`` each, where
    ``armed`` is whether someone played action 3 at the step before. Observation: ``[1, 0, armed]``. So the
    worst action now is 2 (cost 5), and over a horizon of one more step it is 3 (cost 1 + 10 later), except
    at the last step."""

    metadata = {"name": "trap_v0"}

    def __init__(self, max_cycles: int = 6):
        self.possible_agents = ["a_0", "a_1"]
        self.max_cycles = max_cycles

    def observation_space(self, agent: str) -> spaces.Box:
        return spaces.Box(-np.inf, np.inf, (3,), np.float32)

    def action_space(self, agent: str) -> spaces.Discrete:
        return spaces.Discrete(4)

    def _obs(self) -> dict[str, np.ndarray]:
        return {a: np.array([1.0, 0.0, float(self.armed)], dtype=np.float32) for a in self.agents}

    def reset(self, seed: int | None = None, options: dict | None = None):
        self.agents, self.armed, self.t = list(self.possible_agents), False, 0
        return self._obs(), {a: {} for a in self.agents}

    def reward(self, actions: dict[str, int]) -> float:
        """Every agent's reward for the joint action ``actions``."""
        return -sum(COST[int(a)] for a in actions.values()) - TRAP * self.armed

    def rewards(self, actions: dict[str, int]) -> dict[str, float]:
        """Each agent's reward for the joint action ``actions``: here the same for all."""
        r = self.reward(actions)
        return {a: r for a in self.agents}

    def step(self, actions: dict[str, int]):
        rewards = self.rewards(actions)
        self.armed = any(int(a) == 3 for a in actions.values())
        self.t += 1
        done = self.t >= self.max_cycles
        obs = self._obs()
        flags = {a: False for a in self.agents}
        trunc = {a: done for a in self.agents}
        infos = {a: {} for a in self.agents}
        if done:
            self.agents = []
        return obs, rewards, flags, trunc, infos


TRAP_SPEC = EnvSpec("branch_helpers.TrapEnv", {}, name="trap")

MISS = 10.0  # what every agent loses at a step where the two agents play different actions


class MissEnv(TrapEnv):
    """TrapEnv's agents and observations with a coordination reward: ``-MISS`` each at a step where the two
    agents play different actions, else 0. Forcing one agent off the team's greedy action hurts; forcing both
    onto the same other action, as two attacks that each assume the other agent clean do, does not."""

    metadata = {"name": "miss_v0"}

    def reward(self, actions: dict[str, int]) -> float:
        return -MISS * (len({int(a) for a in actions.values()}) > 1)


MISS_SPEC = EnvSpec("branch_helpers.MissEnv", {}, name="miss")

OWN = (0.0, 0.0, 5.0, 1.0)  # what a_0's action costs its own team (a_0)
GAIN = (0.0, 0.0, 10.0, 0.0)  # what it gives the other team (b_0)


class SidesEnv(TrapEnv):
    """TrapEnv's observations (never armed) with two sides, a_0 against b_0, where only a_0's action pays:
    ``-OWN[a_0]`` to a_0 and ``GAIN[a_0]`` to b_0. The action that hurts a_0's team most is 2, the one that
    lowers the mean over both agents most is 3."""

    metadata = {"name": "sides_v0"}

    def __init__(self, max_cycles: int = 6):
        super().__init__(max_cycles)
        self.possible_agents = ["a_0", "b_0"]

    def rewards(self, actions: dict[str, int]) -> dict[str, float]:
        k = int(actions["a_0"])
        return {"a_0": -OWN[k], "b_0": GAIN[k]}


SIDES_SPEC = EnvSpec("branch_helpers.SidesEnv", {}, name="sides")
SIDES = {"red": ("a_0",), "blue": ("b_0",)}


class TrapPolicy(Policy):
    """Logits ``(x0, -x0 - 2, x1, -x1)``: at the clean observation greedy 0 and lowest-ranked 1 (harmless), and
    an l_inf budget of 4 reaches any action."""

    def __init__(self, group: AgentGroup):
        super().__init__()
        self.group = group
        self.w = torch.nn.Parameter(torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]]), requires_grad=False)
        self.c = torch.nn.Parameter(torch.tensor([0.0, -2, 0, 0]), requires_grad=False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs @ self.w.T + self.c


def trap_team(venv: MultiAgentVecEnv) -> TeamPolicy:
    return TeamPolicy(venv.groups, {g.name: TrapPolicy(g) for g in venv.groups},
                      {g.name: ObsNormalizer(g.obs_dim, enabled=False) for g in venv.groups})
