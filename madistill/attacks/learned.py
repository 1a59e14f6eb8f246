"""Learned attacks, trained with SB3 PPO against the frozen team to minimise the team return.

- The learned adversary ("optimal attack" of SA-RL / ATLA, Zhang et al. 2021): its action is the victims'
  observation perturbation within the budget. It needs no gradients of the victims, only their actions.
- The director (PA-AD, Sun et al. 2022, "Who Is the Strongest Enemy?"): its action is, per victim, the policy
  perturbation direction, a target action (Discrete) or a target mean in the action box (Box); targeted PGD
  (:meth:`Attack.force`, white-box on the victim's policy) realises it inside the budget (:class:`Director`).
  It learns in the low-dimensional space of the victims' actions instead of their observations.

Training sees the team through a single-agent gymnasium env (:class:`AdversaryEnv`; the director's copies step
through :class:`DirectorVecEnv`, which realises all their targets in one batch), so SB3 does all the learning;
evaluation applies the trained attack as an ObsTransform (:class:`LearnedAdversary`, :class:`DirectorAttack`).
:class:`TrainingCurve` records the attacker's episode return over training. Under sparse timing
(``attack.frequency`` < 1) the perturbation lands on a random share of steps, in training as in evaluation, so
the attacker learns the attack it is evaluated with.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack
from madistill.attacks.transform import attacked_copies
from madistill.config import AttackConfig
from madistill.envs.factory import EnvSpec, make_env
from madistill.envs.groups import flatten_obs
from madistill.errors import MadistillError
from madistill.policies.base import Policy, TeamPolicy
from madistill.sb3_adapter import quiet
from madistill.seeds import director_seed
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


class Director:
    """Realises a director's action, a target per victim, as observation perturbations: targeted PGD
    (``attack``'s :meth:`Attack.force`) towards each victim's target inside its group's budget, the rows of every
    victim of a group (and every env copy) in one batch.

    The action is one target action per victim (``MultiDiscrete``) when every victim acts in a Discrete space,
    else one point of the action box per victim (``Box``, the concatenated boxes); a mix is refused, as SB3's
    PPO takes no mixed action space. A Discrete target is given by its rank in the victim's clean preference
    order, lowest first: every action stays reachable, a director that always picks rank 0 is targeted_lowest
    with one candidate, and an untrained (uniform) director is the random-target floor, so training starts with
    the gradient attacks' target choices within one constant action's reach. ``reachable``: rank k is instead
    the k-th lowest-ranked action among those the budget reaches (every action forced in one batch, as
    targeted_lowest tries its candidates; past the last reached one, the last), so rank 0 is targeted_lowest
    with every candidate and no target is out of reach, at n actions times the PGD rows."""

    def __init__(self, team: TeamPolicy, victims: Sequence[str], budgets: Mapping[str, Budget], attack: Attack,
                 reachable: bool = False):
        self.slots, self.budgets, self.attack, self.reachable = _slots(team, victims), dict(budgets), attack, reachable
        spaces = [team[g].group.action_space for g, _, _ in self.slots]
        discrete = [isinstance(sp, gym.spaces.Discrete) for sp in spaces]
        if all(discrete):
            self.action_space: gym.Space = gym.spaces.MultiDiscrete([int(sp.n) for sp in spaces])  # type: ignore[attr-defined]
        elif any(discrete):
            raise MadistillError(f"the director needs victims with one kind of action, victims {victims} have Discrete "
                                 "and Box actions: attack them as separate victim sets (attack.victims)")
        else:
            low, high = (np.concatenate([np.asarray(getattr(sp, b), np.float32).ravel() for sp in spaces]) for b in ("low", "high"))
            if not (np.isfinite(low).all() and np.isfinite(high).all()):
                raise MadistillError(f"the director picks target means in the action box, victims {victims} have an "
                                     "unbounded one: leave director out of attack.methods")
            self.action_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.discrete = all(discrete)
        self.obs_dims = [team[g].group.obs_dim for g, _, _ in self.slots]
        self.action_dims = [1 if self.discrete else int(np.prod(sp.shape)) for sp in spaces]  # type: ignore[arg-type]

    def deltas(self, team: TeamPolicy, x: torch.Tensor, action: np.ndarray, generator: torch.Generator | None) -> torch.Tensor:
        """Perturbations ``[n, D]`` in units of the budget radius that force ``action`` ``[n, victims]`` (Box:
        ``[n, sum of action dims]``) on the victims' normalised observations ``x`` ``[n, D]`` (concatenated in
        slot order)."""
        act = torch.as_tensor(np.asarray(action), device=x.device)
        act = act.long() if self.discrete else act.float().clamp(*(torch.as_tensor(b, device=x.device)
                                                                   for b in (self.action_space.low, self.action_space.high)))  # type: ignore[attr-defined]
        obs_at, act_at = np.cumsum([0, *self.obs_dims]), np.cumsum([0, *self.action_dims])
        out = torch.zeros_like(x)
        for group in dict.fromkeys(g for g, _, _ in self.slots):
            ks = [k for k, (g, _, _) in enumerate(self.slots) if g == group]
            rows = torch.cat([x[:, obs_at[k]:obs_at[k + 1]] for k in ks])
            target = torch.cat([act[:, act_at[k]:act_at[k + 1]] for k in ks])
            budget = Budget(self.budgets[group].radius.to(x.device))
            if self.discrete and self.reachable:
                adv = self._reachable(team[group], rows, target[:, 0], budget, generator)
            else:
                if self.discrete:  # rank k: the victim's k-th lowest-ranked action at its clean observation
                    target = team[group](rows).argsort(stable=True, dim=-1).gather(1, target)[:, 0]
                adv = self.attack.force(team[group], rows, target, budget, generator)
            # excluded features have radius 0 and move by 0
            delta = ((adv - rows) / torch.where(budget.radius > 0, budget.radius, 1.0)).clamp(-1, 1)
            for j, k in enumerate(ks):
                out[:, obs_at[k]:obs_at[k + 1]] = delta[j * len(x):(j + 1) * len(x)]
        return out

    def _reachable(self, policy: Policy, x: torch.Tensor, rank: torch.Tensor, budget: Budget,
                   generator: torch.Generator | None) -> torch.Tensor:
        """Per row of ``x`` ``[m, d]``, the perturbation that forces the ``rank``-th lowest-ranked action among those
        the budget reaches: PGD towards every action at once (rank j of row i at row j * m + i)."""
        order = policy(x).argsort(stable=True, dim=-1)  # [m, n], lowest first
        m, n = order.shape
        cand = order.T.reshape(-1)
        adv = self.attack.force(policy, x.repeat(n, 1), cand, budget, generator)
        reached = (policy(adv).argmax(-1) == cand).reshape(n, m).T
        k = torch.minimum(rank, reached.sum(1) - 1).clamp_min(0)
        # the k-th reached candidate; where none is reached, the lowest-ranked one's perturbation
        pick = (reached & (reached.cumsum(1) - 1 == k[:, None])).to(torch.int8).argmax(1)
        return adv.reshape(n, m, -1)[pick, torch.arange(m, device=x.device)]


class DirectorVecEnv(DummyVecEnv):
    """Copies of :class:`AdversaryEnv` driven by a director: each step, the targets the director picked for
    every copy are forced in one batched targeted PGD, and the copies step with the resulting perturbations.
    Its action space is the director's."""

    def __init__(self, env_fns: list, victims: Sequence[str], budgets: Mapping[str, Budget], attack: Attack, seed: int,
                 reachable: bool = False):
        super().__init__(env_fns)
        first: AdversaryEnv = self.envs[0]  # type: ignore[assignment]
        self.team = first.team
        self.director = Director(self.team, victims, {g: Budget(b.radius.cpu()) for g, b in budgets.items()}, attack,
                                 reachable)
        self.action_space = self.director.action_space
        self.generator = torch.Generator().manual_seed(seed)  # PGD's random starts

    def step_async(self, actions: np.ndarray) -> None:
        x = torch.as_tensor(np.stack([env._adversary_obs() for env in self.envs]))  # type: ignore[attr-defined]
        with torch.no_grad():
            delta = self.director.deltas(self.team, x, actions, self.generator)
        super().step_async(delta.numpy())


class TrainingCurve(BaseCallback):
    """The attacker's training curve: after each PPO rollout, the env steps so far and the mean return (to the
    attacker: minus the team's) of the episodes that ended in it."""

    def __init__(self) -> None:
        super().__init__()
        self.points: list[tuple[int, float]] = []
        self._returns: list[float] = []

    def _on_step(self) -> bool:
        self._returns += [float(i["episode"]["r"]) for i in self.locals["infos"] if "episode" in i]
        return True

    def _on_rollout_end(self) -> None:
        if self._returns:
            self.points.append((int(self.num_timesteps), float(np.mean(self._returns))))
        self._returns = []


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
    director: Attack | None = None,
    curve: TrainingCurve | None = None,
    reachable: bool = False,
    model: PPO | None = None,
) -> PPO:
    """Train a PPO attacker for ``steps`` env steps against the frozen ``team``, its perturbation applied
    at a ``frequency`` share of steps, to lower the mean reward of ``target`` (None: of every agent).

    With ``director`` (the targeted PGD that realises the targets) the attacker is a :class:`Director`, else the
    learned adversary (``reachable``: see :class:`Director`). ``ppo_kwargs`` override the config's ``learned_ppo`` (director: ``director_ppo``);
    ``curve`` records the training curve. ``model``: an attacker trained before, which goes on learning (its
    optimiser state and step count kept) against this ``team`` in episodes from ``seed``."""
    def make() -> AdversaryEnv:
        return AdversaryEnv(spec, team, victims, budgets, frequency, target)

    fns = [make] * n_envs
    venv = VecMonitor(DummyVecEnv(fns) if director is None else DirectorVecEnv(fns, victims, budgets, director, seed, reachable))
    venv.seed(seed)
    if model is None:
        defaults = AttackConfig().learned_ppo if director is None else AttackConfig().director_ppo
        model = quiet(PPO("MlpPolicy", venv, seed=seed, device="cpu", verbose=0, **{**defaults, **(ppo_kwargs or {})}))
    else:
        model.set_env(venv)
    model.learn(total_timesteps=steps, callback=curve, reset_num_timesteps=False)
    return model


class AlternatingDirector:
    """A director trained in alternation with the policy it attacks, as ATLA (Zhang et al. 2021) alternates a
    learned adversary with the agent: robust training's inner adversary (``finetune.attack_objective=director``,
    ``distill.adv_collect_objective=director``). Each :meth:`train_against` goes on training the same PPO director
    for ``attack.director_retrain_steps`` env steps against a frozen copy of the team as it is then, every agent a
    victim, its targets realised by ``force`` (targeted PGD); :meth:`transform` applies it to a rollout. The
    director's settings (copies, PPO arguments, reachable ranks) are the suite's ``attack.director_*``; ``seed`` is
    the robust training run's."""

    def __init__(self, spec: EnvSpec, victims: Sequence[str], force: Attack, settings: Any, seed: int):
        self.spec, self.victims, self.force, self.settings, self.seed = spec, list(victims), force, settings, int(seed)
        self.model: PPO | None = None
        self.rounds = 0  # trainings so far, each in episodes of its own (madistill/seeds.py: director_seed)
        self.curve = TrainingCurve()

    def train_against(self, team: TeamPolicy, unit_budgets: Mapping[str, Budget], eps: float) -> None:
        """Train the director ``attack.director_retrain_steps`` more env steps against ``team`` as it is now,
        within radius ``eps`` of the ``unit_budgets`` (the budgets :meth:`transform` is given at that eps)."""
        ac = self.settings
        budgets = {name: b.scaled(float(eps)) for name, b in unit_budgets.items()}
        self.model = train_adversary(self.spec, team, self.victims, budgets, int(ac.director_retrain_steps),
                                     director_seed(self.seed, self.rounds), n_envs=int(ac.director_envs),
                                     ppo_kwargs=dict(ac.director_ppo), director=self.force, curve=self.curve,
                                     reachable=bool(ac.director_reachable), model=self.model)
        self.rounds += 1

    def transform(self, budgets: Mapping[str, Budget], frequency: float,
                  surrogate: TeamPolicy | None = None) -> DirectorAttack:
        """The director as an attack on a ``frequency`` share of env copies and steps, its targets forced on
        ``surrogate`` (None: the acting team). Later trainings go on in the same model, so they take effect in
        the transform."""
        if self.model is None:
            raise RuntimeError("train the director (train_against) before applying it")
        return DirectorAttack(self.model, self.victims, budgets, self.force, frequency,
                              bool(self.settings.director_reachable), surrogate)


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
        delta = self.deltas(x, ctx)
        now = attacked_copies(len(x), self.frequency, ctx.generator, x.device)
        out = {g: t.clone() for g, t in obs.items()}
        start = 0
        for g, i, _ in slots:
            r = self.budgets[g].radius.to(x.device)
            live = ctx.active[g][:, i, None] & now[:, None]
            out[g][:, i] = torch.where(live, obs[g][:, i] + delta[:, start : start + len(r)] * r, obs[g][:, i])
            start += len(r)
        return out

    def deltas(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The perturbation of the victims' observations ``x`` ``[n, D]``, in units of the budget radius."""
        return torch.as_tensor(np.clip(self._act(x), -1, 1), dtype=torch.float32, device=x.device)

    def _act(self, x: torch.Tensor) -> np.ndarray:
        """The trained attacker's deterministic action at the victims' observations ``x``."""
        return self.model.predict(x.detach().cpu().numpy(), deterministic=True)[0]


class DirectorAttack(LearnedAdversary):
    """Applies a trained director: its deterministic targets, realised by :class:`Director`'s targeted PGD on the
    acting team (or on ``surrogate``), on the live victims (white-box on the victims' policies), with chance
    ``frequency`` per step."""

    def __init__(self, model: PPO, victims: Sequence[str], budgets: Mapping[str, Budget], attack: Attack,
                 frequency: float = 1.0, reachable: bool = False, surrogate: TeamPolicy | None = None):
        super().__init__(model, victims, budgets, frequency)
        self.attack, self.reachable, self.surrogate = attack, reachable, surrogate
        self._director: tuple[TeamPolicy, Director] | None = None  # built for the attacked team at its first step

    def deltas(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        team = self.surrogate or ctx.team
        if self._director is None or self._director[0] is not team:
            self._director = (team, Director(team, self.victims, self.budgets, self.attack, self.reachable))
        with torch.no_grad():
            return self._director[1].deltas(team, x, self._act(x), ctx.generator)
