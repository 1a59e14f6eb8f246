"""The learned adversary ("optimal attack" of SA-RL / ATLA, Zhang et al. 2021): an SB3 PPO agent whose action
is the victims' observation perturbation within the budget, trained against the frozen team to minimise the
team return. It needs no gradients of the victims, only their actions.

Training sees the team through a single-agent gymnasium env (:class:`AdversaryEnv`), so SB3 does all the
learning; evaluation applies the trained adversary as an ObsTransform (:class:`LearnedAdversary`). Under sparse
timing (``attack.frequency`` < 1) the perturbation lands on a random share of steps, in training as in
evaluation, so the adversary learns the attack it is evaluated with.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from madistill.attacks.budget import Budget
from madistill.attacks.transform import attacked_copies
from madistill.config import AttackConfig
from madistill.envs.factory import EnvSpec, make_env
from madistill.envs.groups import flatten_obs
from madistill.policies.base import TeamPolicy
from madistill.transforms import GroupTensors, ObsTransform, StepContext


def _slots(team: TeamPolicy, victims: Sequence[str]) -> list[tuple[str, int, str]]:
    """(group, slot in group, agent) for each victim, in the team's group order."""
    return [(g.name, i, a) for g in team.groups for i, a in enumerate(g.agents) if a in victims]


class AdversaryEnv(gym.Env):
    """One env copy with the frozen team acting greedily; the agent here perturbs the victims' normalised
    observations (action in [-1, 1] per feature, scaled by the budget radius) and is rewarded with minus the
    team reward (the mean over agents of their rewards; over the ``target`` agents only when given, e.g. the
    victims' team where teams oppose each other). ``frequency``: the chance that the perturbation is
    applied at a step (drawn from the env's seeded generator; the adversary acts at every step regardless)."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, spec: EnvSpec, team: TeamPolicy, victims: Sequence[str], budgets: Mapping[str, Budget],
                 frequency: float = 1.0, target: Sequence[str] | None = None):
        super().__init__()
        self.frequency = float(frequency)
        self.target = None if target is None else set(target)
        self.env = make_env(spec)
        # a copy: Module.to moves in place, and the caller keeps attacking its team on its own device
        self.team = copy.deepcopy(team).to("cpu")
        self.slots = _slots(self.team, victims)
        self.radius = torch.cat([budgets[g].radius.cpu() for g, _, _ in self.slots])
        self.spaces = {a: self.env.observation_space(a) for a in self.env.possible_agents}
        dim = int(self.radius.numel())
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (dim,), np.float32)
        self._obs: dict[str, torch.Tensor] = {}  # normalised observations of the live agents

    def _observe(self, obs: dict[str, Any]) -> None:
        """Flatten and normalise the env's observations once per step (the adversary and the team read them)."""
        self._obs = {}
        for a, o in obs.items():
            group = self.team.group_of[a]
            raw = torch.as_tensor(flatten_obs(self.spaces[a], o))[None]
            self._obs[a] = self.team.normalizers[group].normalize(raw)[0]

    def _normalised(self, agent: str) -> torch.Tensor:
        """The agent's normalised observation; zeros (the absorbing padding) once it is done."""
        x = self._obs.get(agent)
        return torch.zeros(self.team[self.team.group_of[agent]].group.obs_dim) if x is None else x

    def _adversary_obs(self) -> np.ndarray:
        return torch.cat([self._normalised(a) for _, _, a in self.slots]).numpy().astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        obs, _ = self.env.reset(seed=seed)
        self._observe(obs)
        return self._adversary_obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        delta = torch.as_tensor(np.clip(action, -1, 1), dtype=torch.float32) * self.radius
        if self.frequency < 1.0 and self.np_random.random() >= self.frequency:
            delta = torch.zeros_like(delta)
        perturbed, start = {}, 0
        for _, _, agent in self.slots:
            x = self._normalised(agent)
            perturbed[agent] = x + delta[start : start + len(x)]
            start += len(x)
        actions = {}
        with torch.no_grad():
            for agent in self.env.agents:
                group = self.team.group_of[agent]
                x = perturbed[agent] if agent in perturbed else self._normalised(agent)
                a = self.team[group].act(x[None], deterministic=True)[0].numpy()
                space = self.env.action_space(agent)
                actions[agent] = int(a) if isinstance(space, gym.spaces.Discrete) else np.clip(a, space.low, space.high)
        obs, rewards, terms, truncs, _ = self.env.step(actions)
        self._observe(obs)
        scored = [r for a, r in rewards.items() if self.target is None or a in self.target]
        reward = -float(np.mean(scored)) if scored else 0.0
        done = not self.env.agents
        truncated = done and all(truncs.values()) and not any(terms.values())
        return self._adversary_obs(), reward, done and not truncated, truncated, {}


def train_adversary(
    spec: EnvSpec,
    team: TeamPolicy,
    victims: Sequence[str],
    budgets: Mapping[str, Budget],
    steps: int,
    seed: int = 0,
    n_envs: int = AttackConfig.learned_envs,
    ppo_kwargs: Mapping[str, Any] | None = None,
    frequency: float = 1.0,
    target: Sequence[str] | None = None,
) -> PPO:
    """Train a PPO adversary for ``steps`` env steps against the frozen ``team``, its perturbation applied
    at a ``frequency`` share of steps, to lower the mean reward of ``target`` (None: of every agent)."""
    venv = DummyVecEnv([lambda: AdversaryEnv(spec, team, victims, budgets, frequency, target) for _ in range(n_envs)])
    venv.seed(seed)
    kwargs = {**AttackConfig().learned_ppo, **(ppo_kwargs or {})}  # the config's defaults, one source
    model = PPO("MlpPolicy", venv, seed=seed, device="cpu", verbose=0, **kwargs)
    model.learn(total_timesteps=steps)
    return model


class LearnedAdversary(ObsTransform):
    """Applies a trained adversary's deterministic perturbation to the live victims (white-box free), in each
    env copy with chance ``frequency`` per step (drawn from the rollout's generator, like AttackTransform)."""

    shared_stream = True  # its sparse timing draws from the rollout's generator

    def __init__(self, model: PPO, victims: Sequence[str], budgets: Mapping[str, Budget], frequency: float = 1.0):
        self.model, self.victims, self.budgets = model, list(victims), dict(budgets)
        self.frequency = float(frequency)

    def __call__(self, obs: GroupTensors, ctx: StepContext) -> GroupTensors:
        slots = _slots(ctx.team, self.victims)
        x = torch.cat([obs[g][:, i] * ctx.active[g][:, i, None] for g, i, _ in slots], dim=-1)
        action, _ = self.model.predict(x.detach().cpu().numpy(), deterministic=True)
        delta = torch.as_tensor(np.clip(action, -1, 1), dtype=torch.float32, device=x.device)
        now = attacked_copies(len(x), self.frequency, ctx.generator, x.device)
        out = {g: t.clone() for g, t in obs.items()}
        start = 0
        for g, i, _ in slots:
            r = self.budgets[g].radius.to(x.device)
            live = ctx.active[g][:, i, None] & now[:, None]
            out[g][:, i] = torch.where(live, obs[g][:, i] + delta[:, start : start + len(r)] * r, obs[g][:, i])
            start += len(r)
        return out
