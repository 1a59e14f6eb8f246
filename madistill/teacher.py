"""Teacher training: SB3's PPO learns every group; madistill collects the multi-agent rollouts.

Each group gets one ``stable_baselines3.PPO`` whose "environments" are the group's agent slots in all env
copies (parameter sharing within the group). All groups act in the same envs through the shared rollout
loop; after each rollout every group's PPO runs its own ``train()`` (its losses, optimiser, clipping).

With ``teacher.update_mode=thread`` the groups act through copies of their policies, and each ``train()``
runs in a background thread on one of two rollout buffers while the next rollout fills the other: the
environments (worker processes) and the update share the cores instead of taking turns (PyTorch and the env
pipes release the interpreter lock, so the thread runs while the collector waits).

Other trainers of SB3 actor-critics (robust fine-tuning) use the same loop through explicit parameters
(budget, learning rate, first episode seed, start policies) and an :data:`ExtraLoss` per group, a loss whose
gradient joins PPO's at every optimiser step; madistill/sb3_adapter.py holds what touches SB3's internals.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from stable_baselines3 import PPO
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.utils import LinearSchedule
from tqdm.auto import tqdm

from madistill import interrupts
from madistill.bonus import MutualInformationBonus
from madistill.config import Checks, PPOConfig
from madistill.envs.episodes import EpisodeRecord
from madistill.envs.factory import EnvSpec
from madistill.envs.groups import AgentGroup
from madistill.envs.teams import several_teams, team_means
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies.base import TeamPolicy, log_prob, warn_if_large
from madistill.policies.sb3 import (
    SB3Policy,
    policy_kwargs,
    sb3_observation_space,
    sb3_policy_class,
    team_state_dim,
)
from madistill.policies.store import CHECKPOINT, FINETUNE_CHECKPOINT, load_team, save_team
from madistill.rollout import Rollout, Transition
from madistill.runtime import env_teams
from madistill.sb3_adapter import (
    MaskedRolloutBuffer,
    ScheduledEntropyPPO,
    SpacesOnlyVecEnv,
    actor_parameters,
    check_model,
    progress_done,
    quiet,
    set_progress,
    set_update_count,
    take_logged,
    update_count,
)
from madistill.tb import TBLogger
from madistill.transforms import GroupTensors, ObsTransform, normalize

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
EXTRA_PREFIX = "extra/"  # where an extra loss's logged values go in SB3's logger (losses/<group>/<key> in TensorBoard)


def _check_group_names(setting: str, named: Any, group_names: list[str]) -> None:
    """A per-group setting that names a group this env does not have is a user error (a typo, another env)."""
    unknown = sorted(set(named) - set(group_names))
    if unknown:
        raise MadistillError(f"{setting} names unknown group(s) {unknown}: this env's groups are {group_names}")


def group_ppo_settings(teacher_cfg: Any, group_names: list[str],
                       base: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Each group's SB3 PPO keyword arguments: ``teacher.ppo`` with ``base`` over it (a trainer's own
    settings, e.g. fine-tuning's learning rate), then the group's ``teacher.group_ppo`` overrides, with the
    ``teacher.anneal`` settings as linear schedules from their value to that fraction of it."""
    tc = teacher_cfg
    _check_group_names("teacher.group_ppo", tc.group_ppo, group_names)
    out = {}
    for name in group_names:
        try:  # merged into the typed teacher.ppo node, so a wrong key or type fails as a bad override does
            settings = OmegaConf.to_container(OmegaConf.merge(tc.ppo, dict(base or {}), tc.group_ppo.get(name, {})))
        except OmegaConfBaseException as e:
            raise MadistillError(f"teacher.group_ppo.{name}: {str(e).splitlines()[0]} (the keys are teacher.ppo's)") from e
        PPOConfig.validate(Checks(settings, f"teacher.group_ppo.{name}"))
        if settings["n_steps"] != tc.ppo.n_steps:
            raise MadistillError("teacher.group_ppo cannot set n_steps (every group acts in the same rollouts): set teacher.ppo.n_steps")
        for key, fraction in tc.anneal.items():
            if fraction is None:
                continue
            start = float(settings[key])
            settings[key] = LinearSchedule(start, start * float(fraction), 1.0)
        out[name] = settings
    return out


def message_bonuses(teacher_cfg: Any, groups: list[AgentGroup]) -> dict[str, MutualInformationBonus]:
    """The ``teacher.message_bonus`` of each group that has one (group name -> coefficient; 0 adds none)."""
    by_name = {g.name: g for g in groups}
    _check_group_names("teacher.message_bonus", teacher_cfg.message_bonus, list(by_name))
    out = {}
    for name, coef in teacher_cfg.message_bonus.items():
        action_space = by_name[name].action_space
        if not isinstance(action_space, spaces.Discrete):
            raise MadistillError(f"teacher.message_bonus.{name}: group {name!r} acts in {action_space}, and the bonus "
                                 f"needs a Discrete action space: remove teacher.message_bonus.{name}")
        if coef:
            out[name] = MutualInformationBonus(coef, int(action_space.n), horizon=int(teacher_cfg.ppo.n_steps))
    return out


def bootstrap_obs(tr: Transition) -> dict[str, np.ndarray]:
    """Every agent's raw observation at the end of ``tr``'s step, the state a truncated agent's value is
    bootstrapped from: the final observation of an agent whose episode ended (in a copy whose episode ended, of
    every agent, zeros for those gone before), the next observation of an agent that plays on. A centralised
    critic reads its teammates' part of it, so an agent cut off by a time limit while they play on sees them as
    they are, not gone."""
    res = tr.result
    gone = [res.dones[n] | ~tr.active[n].cpu().numpy() for n in res.obs]
    copy_over = np.concatenate(gone, axis=1).all(axis=1)  # the copy reset: res.obs is its next episode's
    return {n: np.where((res.dones[n] | copy_over[:, None])[..., None], res.final_obs[n], res.obs[n]) for n in res.obs}


def _check_batch_size(group: AgentGroup, num_envs: int, ppo_kwargs: dict[str, Any]) -> None:
    """Say in madistill's terms (SB3's warning counts agent slots as envs) when minibatches do not tile the
    agent-steps a group collects per update: the last one is short, or the only one is the whole rollout."""
    size = int(ppo_kwargs["n_steps"]) * num_envs * group.n_agents
    batch = int(ppo_kwargs["batch_size"])
    if size % batch:
        per_update = f"{size // batch} minibatch(es) of {batch} and one of {size % batch}" if size > batch else f"one minibatch of {size}"
        log.warning(f"group {group.name!r} collects {size} agent-steps per update (teacher.ppo.n_steps x env.num_envs x "
                    f"{group.n_agents} agents; fewer where agents leave early), so batch_size={batch} gives "
                    f"{per_update}: set teacher.ppo.batch_size (or teacher.group_ppo.{group.name}.batch_size) to a "
                    f"divisor of {size} for equal minibatches")


def build_model(group: AgentGroup, num_envs: int, arch: dict[str, Any], ppo_kwargs: dict[str, Any],
                seed: int, device: torch.device | str) -> ScheduledEntropyPPO:
    """The group's SB3 PPO, sized for its agent slots in ``num_envs`` copies, with a silent logger."""
    width = num_envs * group.n_agents
    with warnings.catch_warnings():  # TeacherTrainer says it in madistill's terms (_check_batch_size)
        warnings.filterwarnings("ignore", message="You have specified a mini-batch size")
        model = ScheduledEntropyPPO(
            sb3_policy_class(arch),
            SpacesOnlyVecEnv(width, sb3_observation_space(group, arch), group.action_space),
            rollout_buffer_class=MaskedRolloutBuffer,
            # foreach: one Adam kernel for all parameters (the same arithmetic); eps: SB3 sets 1e-5 only when
            # it is given no optimizer_kwargs at all, so it is restated here
            policy_kwargs={**policy_kwargs(group, arch), "optimizer_kwargs": {"eps": 1e-5, "foreach": True}},
            seed=seed,
            device=device,
            **ppo_kwargs,
        )
    quiet(model)
    check_model(model)
    return model


def minibatch_rng(seed: int, group_index: int) -> np.random.Generator:
    """The minibatch-order stream of a background update: its own, so the collector cannot shift the order."""
    return np.random.default_rng([int(seed), group_index])


def load_model_state(model: PPO, policy_state: dict, optimizer_state: dict, n_updates: int) -> None:
    """Put a checkpoint's weights, optimiser state and SB3 update count into ``model``."""
    model.policy.load_state_dict(policy_state)
    model.policy.optimizer.load_state_dict(optimizer_state)
    for group in model.policy.optimizer.param_groups:  # checkpoints from before foreach keep theirs (None: slower)
        group["foreach"] = True
    set_update_count(model, n_updates)


def train_model(model: PPO, total: int, agent_steps: int) -> dict[str, float]:
    """One PPO ``train()`` on the model's rollout buffer at ``agent_steps`` of ``total``; SB3's logged losses."""
    set_progress(model, agent_steps, total)
    model.train()
    return take_logged(model, agent_steps)


@dataclass
class OptimizerStep:
    """What an :data:`ExtraLoss` sees at one of a group's PPO optimiser steps, after SB3 computed and clipped
    the minibatch's gradient and before the step applies it."""

    group: AgentGroup
    policy: SB3Policy  # the learner's weights (not an acting copy)
    progress: float  # share of training done at this update, in [0, 1]
    batch_size: int  # PPO's minibatch size
    buffer: MaskedRolloutBuffer  # the rollout being learned from
    logger: Logger  # SB3's logger of the update
    device: torch.device

    def live_observations(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """``n`` (at most all) distinct observations of live agents from the rollout, drawn by ``rng``: the
        group's own observation, without a centralised critic's team state."""
        return self.buffer.live_observations(n, rng, self.group.obs_dim, self.device)

    def log(self, key: str, value: float, mean: bool = False) -> None:
        """Log ``value`` with the update's losses (``losses/<group>/<key>``); ``mean``: averaged over the
        update's steps, else the last one's."""
        (self.logger.record_mean if mean else self.logger.record)(EXTRA_PREFIX + key, value)


# A loss on a group's actor added at each of its PPO optimiser steps (None: none at this step); its gradient on
# the actor's parameters, clipped to PPO's max_grad_norm on its own, joins PPO's before the step.
ExtraLoss = Callable[[OptimizerStep], "torch.Tensor | None"]


def add_extra_loss(model: ScheduledEntropyPPO, group: AgentGroup, policy: SB3Policy, loss: ExtraLoss) -> None:
    """Add ``loss`` to every optimiser step of ``model`` (``policy``: an SB3Policy over ``model.policy``)."""
    parameters = actor_parameters(policy.sb3)

    def before_step() -> None:
        value = loss(OptimizerStep(group, policy, progress_done(model), int(model.batch_size), model.rollout_buffer,
                                   model.logger, model.device))
        if value is None:
            return
        grads = torch.autograd.grad(value, parameters)
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        scale = min(1.0, float(model.max_grad_norm) / (norm + 1e-6))
        for p, g in zip(parameters, grads):
            if p.grad is None:
                p.grad = g * scale
            else:  # in place: the fast update keeps the gradients as views of one tensor
                p.grad.add_(g * scale)

    model.step_hooks.append(before_step)


@dataclass
class _GroupLearner:
    group: AgentGroup
    model: ScheduledEntropyPPO
    actor: SB3Policy  # what acts in the envs: the learner's own policy, or a copy of it (overlapped updates)
    buffers: list[MaskedRolloutBuffer]  # one, or two that the collector and the update swap (overlapped updates)
    episode_starts: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def collecting(self) -> MaskedRolloutBuffer:
        return self.buffers[0]

    def hand_over(self) -> None:
        """Give the filled buffer to PPO's ``train()``; the collector takes the other one."""
        self.model.rollout_buffer = self.buffers[0]
        self.buffers.reverse()


class TeacherTrainer:
    """Trains one PPO per group together in one vector env; checkpointable and resumable. A context manager:
    with ``teacher.update_mode=thread`` it owns the update thread until ``close()``."""

    def __init__(self, cfg: Any, venv: MultiAgentVecEnv, spec: EnvSpec, device: torch.device, tb: TBLogger | None,
                 start: TeamPolicy | None = None, transforms: Sequence[ObsTransform] = (),
                 total_agent_steps: int | None = None, learning_rate: float | None = None,
                 episode_seed: int | None = None, extra_losses: Mapping[str, ExtraLoss] | None = None):
        """``start``: SB3 policies (one architecture for all groups) to continue from instead of fresh ones, with
        their normalisers kept fixed (robust fine-tuning starts from a student's actor and its teacher's critic);
        its architecture replaces ``teacher.hidden_sizes``, ``activation`` and ``critic``. ``transforms``: what
        the rollouts apply to the normalised observations (an attack, for training under it); PPO learns from the
        observations the policies saw. ``total_agent_steps``, ``learning_rate`` and ``episode_seed`` (the first
        episode's seed) replace ``teacher.total_agent_steps``, ``teacher.ppo.learning_rate`` and ``seed``;
        ``extra_losses``: by group name, a loss added at each of its PPO optimiser steps."""
        self.cfg, self.venv, self.spec, self.device, self.tb = cfg, venv, spec, device, tb
        self.transforms = list(transforms)
        tc = cfg.teacher
        if start is not None:
            self.arch = _start_arch(start)
        else:
            # a centralised critic reads every agent's observation of the env copy after the agent's own
            state_dim = sum(g.n_agents * g.obs_dim for g in venv.groups) if tc.critic == "central" else 0
            self.arch = {"hidden_sizes": list(tc.hidden_sizes), "activation": tc.activation, "team_state_dim": state_dim}
            if any(g.image_shape is not None for g in venv.groups):
                self.arch["cnn"] = OmegaConf.to_container(tc.cnn)
        # From start policies, inputs keep the units those were trained in (fresh teachers learn theirs as they
        # go), and the run does not resume (teacher.resume rebuilds fresh teachers).
        self.from_start = start is not None
        ppo_settings = group_ppo_settings(tc, venv.group_names, None if learning_rate is None else {"learning_rate": learning_rate})
        self.total_agent_steps = int(tc.total_agent_steps if total_agent_steps is None else total_agent_steps)
        self.n_steps = int(tc.ppo.n_steps)
        self.bootstrap_truncated = bool(tc.bootstrap_truncated)
        # opposing sides: the mean over every agent hides how each side does, so progress shows each team's
        teams = env_teams(cfg.env, venv)
        self.teams = teams if several_teams(teams) else {}
        self.update_mode = str(tc.update_mode)
        self.overlap = self.update_mode != "inline"
        self.learners: dict[str, _GroupLearner] = {}
        normalizers = {}
        for gi, g in enumerate(venv.groups):
            # Groups with equal spaces (env.grouping=per_agent) would start from equal weights under one seed.
            # bool(): gymnasium's Discrete compares to a numpy bool, and SB3 passes the seed to random.seed,
            # which takes Python ints only.
            twins = sum(bool(h.observation_space == g.observation_space and h.action_space == g.action_space)
                        for h in venv.groups[:gi])
            _check_batch_size(g, venv.num_envs, ppo_settings[g.name])
            model = build_model(g, venv.num_envs, self.arch, ppo_settings[g.name], cfg.seed + twins, device)
            buffers, policy = [model.rollout_buffer], model.policy
            if self.overlap:
                buffers.append(copy.deepcopy(model.rollout_buffer))
                model.rollout_buffer.rng = buffers[1].rng = minibatch_rng(cfg.seed, gi)
                policy = copy.deepcopy(model.policy)
            actor = SB3Policy(g, policy, self.arch)
            width = venv.num_envs * g.n_agents
            self.learners[g.name] = _GroupLearner(g, model, actor, buffers, np.ones(width, dtype=np.float32))
            normalizers[g.name] = ObsNormalizer.for_group(g, enabled=tc.normalize_obs)
            if start is None:
                warn_if_large(actor, "teacher", int(cfg.warn_parameters))
        self.team = TeamPolicy(venv.groups, {n: lr.actor for n, lr in self.learners.items()}, normalizers)
        self.bonuses = message_bonuses(tc, venv.groups)
        self.agent_steps = 0
        self.iteration = 0
        # the first copy's next fresh episode seed (resuming must not replay any)
        self.episode_seed = int(cfg.seed if episode_seed is None else episode_seed)
        self._pending: Future | None = None  # the update running in the background ...
        self._pending_step = 0  # ... and the agent step its losses are logged at
        if start is not None:
            for name, lr in self.learners.items():
                lr.model.policy.load_state_dict(start[name].sb3.state_dict())
                self.team.normalizers[name] = start.normalizers[name]
            self._copy_to_actors()
        elif tc.resume:
            self._restore(Path(tc.resume))
        _check_group_names("extra_losses", extra_losses or {}, venv.group_names)
        for name, loss in (extra_losses or {}).items():
            lr = self.learners[name]
            add_extra_loss(lr.model, lr.group, SB3Policy(lr.group, lr.model.policy, self.arch), loss)
        self._pool: ThreadPoolExecutor | None = None  # the update thread (update_mode=thread), from train() to close()

    # ---- collection -------------------------------------------------------------------------
    def _critic_inputs(self, obs: GroupTensors) -> GroupTensors:
        """Each group's critic (and buffer) input ``[N * n_g, D]`` from normalised observations ``[N, n_g, d]``:
        the agent's own observation, then, for a centralised critic, every agent's of the same env copy."""
        own = {g.name: obs[g.name].reshape(-1, g.obs_dim) for g in self.venv.groups}
        if not team_state_dim(self.arch):
            return own
        n = next(iter(obs.values())).shape[0]
        state = torch.cat([obs[g.name].reshape(n, -1) for g in self.venv.groups], dim=1)
        return {g.name: torch.cat([obs[g.name], state.unsqueeze(1).expand(n, g.n_agents, -1)], dim=2).reshape(n * g.n_agents, -1)
                for g in self.venv.groups}

    def _on_step(self, tr: Transition) -> None:
        res = tr.result
        critic_in = self._critic_inputs(tr.obs)
        final_in = None
        for name, lr in self.learners.items():
            g, model = lr.group, lr.model
            obs = critic_in[name]
            actions = tr.actions[name].reshape(obs.shape[0], *tr.actions[name].shape[2:])
            active = tr.active[name].reshape(-1).cpu().numpy()
            policy = self.team[name]
            with torch.no_grad():
                values = policy.critic_value(obs)
                logp = log_prob(tr.dists[name], actions)
            rewards = res.rewards[name].reshape(-1).astype(np.float32).copy()
            if name in self.bonuses:
                rewards += self.bonuses[name](tr.dists[name], actions, tr.active[name]).numpy()
            trunc = res.truncated[name].reshape(-1) & self.bootstrap_truncated
            if trunc.any():  # time-limit ends that are not real ends: bootstrap from the final observation
                if final_in is None:
                    final_in = self._critic_inputs(normalize(self.team, bootstrap_obs(tr)))
                with torch.no_grad():
                    v_final = policy.critic_value(final_in[name][torch.as_tensor(trunc, device=self.device)]).cpu().numpy()
                rewards[trunc] += model.gamma * v_final
            buf = lr.collecting
            buf.valid[buf.pos] = active
            buf.add(obs.cpu().numpy(), actions.cpu().numpy(), rewards, lr.episode_starts, values, logp)
            next_active = res.active[name].reshape(-1)
            lr.episode_starts = (res.dones[name].reshape(-1) | ~next_active).astype(np.float32)
            if not self.from_start:
                self.team.normalizers[name].update(tr.raw_obs[name].reshape(-1, g.obs_dim)[active])

    def _finish_rollout(self, rollout: Rollout) -> None:
        last_in = self._critic_inputs(normalize(self.team, rollout.raw_obs))
        for name, lr in self.learners.items():
            with torch.no_grad():
                last_values = self.team[name].critic_value(last_in[name])
            lr.collecting.compute_returns_and_advantage(last_values=last_values, dones=lr.episode_starts)

    # ---- training ----------------------------------------------------------------------------
    def train(self, run_dir: Path, validate: Callable[[int, TeamPolicy], Any] | None = None,
              validate_every: int = 0, alternate: Callable[[int, TeamPolicy], Any] | None = None,
              alternate_every: int = 0) -> TeamPolicy:
        """Train until ``teacher.total_agent_steps``; Ctrl-C saves a checkpoint and re-raises.

        ``validate(agent_steps, team)`` is called with the up-to-date team every ``validate_every`` agent-steps
        and at the end (checkpoint selection: a caller that keeps the best team it was shown);
        ``alternate(agent_steps, team)`` every ``alternate_every`` agent-steps but not at the end (an adversary
        trained in alternation with the team, as in ATLA)."""
        total = self.total_agent_steps
        validated = -1
        per_iter = self.n_steps * self.venv.num_envs * len(self.venv.possible_agents)
        # PPO updates on whole rollouts (SB3's learn() also ends on the first rollout that reaches the budget), so a
        # budget between two rollouts is rounded up to the next one rather than the last rollout cut short.
        end = self.agent_steps + -(-(total - self.agent_steps) // per_iter) * per_iter
        if end != total:
            tqdm.write(f"training {end} agent-steps: the budget of {total} rounded up to whole rollouts of {per_iter} "
                       f"(teacher.ppo.n_steps x env.num_envs x {len(self.venv.possible_agents)} agents)")
        every = int(self.cfg.teacher.checkpoint_every)
        rollout = Rollout(self.venv, self.team, self.transforms, seed=self.episode_seed)
        bar = tqdm(
            total=end, initial=self.agent_steps, desc="train", unit="agent-step", unit_scale=True,
            disable=not self.cfg.logger.progress,
        )
        if self.overlap and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="madistill-update")
        with bar:
            try:
                while self.agent_steps < total:
                    interrupts.check()  # a sweep whose launcher alone was interrupted stops here too
                    t0 = time.perf_counter()
                    for lr in self.learners.values():
                        lr.collecting.reset()
                        lr.actor.sb3.set_training_mode(False)  # SB3's train() leaves its policy in training mode
                    episodes = rollout.run(steps=self.n_steps, on_step=self._on_step)
                    self._finish_rollout(rollout)
                    t_collect = time.perf_counter() - t0
                    self._sync()  # the previous update (overlap) must finish before this one starts
                    for lr in self.learners.values():
                        lr.hand_over()
                    if self._pool is not None:  # update_mode=thread
                        self._pending = self._pool.submit(self._update, total, self.agent_steps)
                        self._pending_step = self.agent_steps + per_iter
                    else:
                        self._log_losses(self._update(total, self.agent_steps), self.agent_steps + per_iter)
                    self.agent_steps += per_iter
                    self.iteration += 1
                    dt = time.perf_counter() - t0
                    bar.update(per_iter)
                    self.episode_seed = int(self.venv.episode_seeds.max()) + 1  # past every episode begun so far
                    returns = self._returns(episodes) if episodes else None  # once, for the bar and the log
                    if returns is not None:
                        bar.set_postfix({t: f"{m:.2f}" for t, m in returns[1].items()} or {"team_return": f"{returns[0]:.2f}"})
                    self._log(episodes, returns, per_iter / dt, t_collect / dt)
                    if _crossed(every, self.agent_steps, per_iter):
                        self.save_checkpoint(run_dir / "checkpoint")
                    if validate is not None and _crossed(validate_every, self.agent_steps, per_iter):
                        self._sync()
                        validate(self.agent_steps, self.team)
                        validated = self.agent_steps
                    if alternate is not None and self.agent_steps < total and _crossed(alternate_every, self.agent_steps, per_iter):
                        self._sync()
                        alternate(self.agent_steps, self.team)
            except KeyboardInterrupt:
                with interrupts.held("saving the checkpoint before stopping: it takes a moment"):
                    path = self.save_checkpoint(run_dir / "checkpoint")  # takes the pending update first
                resume = f"resume with teacher.resume={path}" if not self.from_start else "a fine-tune starts afresh"
                tqdm.write(f"interrupted: checkpoint saved to {path}; {resume}")
                raise
            self._sync()
            if validate is not None and validated != self.agent_steps:
                validate(self.agent_steps, self.team)
        return self.team

    def close(self) -> None:
        """Stop the update thread (``update_mode=thread``) once its update ends; the trainer can still save."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> TeacherTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _update(self, total: int, agent_steps: int) -> dict[str, dict[str, float]]:
        """One PPO ``train()`` per group on its handed-over buffer; returns SB3's logged losses."""
        return {name: train_model(lr.model, total, agent_steps) for name, lr in self.learners.items()}

    def _sync(self) -> None:
        """Wait for the background update, if any, let the acting copies take its weights, and log its losses
        at the step of the data it learned from (wherever it is taken: the loop, a checkpoint, the end)."""
        if self._pending is None:
            return
        losses, self._pending = self._pending.result(), None
        self._copy_to_actors()
        self._log_losses(losses, self._pending_step)

    def _copy_to_actors(self) -> None:
        """The acting copies (overlapped updates) take the learners' weights; without copies they are the same."""
        if self.overlap:
            for lr in self.learners.values():
                lr.actor.sb3.load_state_dict(lr.model.policy.state_dict())

    def _log(self, episodes: list[EpisodeRecord], returns: tuple[float, dict[str, float]] | None, sps: float,
             collect_share: float) -> None:
        """TensorBoard charts of an iteration: its ``episodes`` with their ``returns`` (``_returns``; None
        without episodes), the message bonuses, speed and the collection's share of the time."""
        if self.tb is None:
            return
        step = self.agent_steps
        if returns is not None:
            team_return, by_team = returns
            self.tb.scalar("charts/episodic_return", team_return, step)
            self.tb.scalar("charts/episodic_length", np.mean([e.length for e in episodes]), step)
            for agent in self.venv.possible_agents:
                self.tb.scalar(f"charts/episodic_return/{agent}", np.mean([e.agent_returns[agent] for e in episodes]), step)
            for team, mean in by_team.items():
                self.tb.scalar(f"charts/team_return/{team}", mean, step)
        for name, bonus in self.bonuses.items():
            self.tb.scalar(f"charts/marginal_action_entropy/{name}", bonus.entropy(), step)
        self.tb.scalar("charts/SPS", sps, step)
        self.tb.scalar("charts/collect_time_share", collect_share, step)

    def _returns(self, episodes: list[EpisodeRecord]) -> tuple[float, dict[str, float]]:
        """The mean team return of ``episodes`` (of every agent) and, where there are several teams, each
        team's mean return (the progress bar shows those instead)."""
        return float(np.mean([e.team_return for e in episodes])), team_means(episodes, self.teams)

    def _log_losses(self, losses: dict[str, dict[str, float]], step: int) -> None:
        """SB3's logged values of one update per group, under CleanRL-style tags."""
        if self.tb is None:
            return
        names = {
            "train/value_loss": "value_loss", "train/policy_gradient_loss": "policy_loss",
            "train/entropy_loss": "entropy_loss", "train/approx_kl": "approx_kl",
            "train/clip_fraction": "clipfrac", "train/explained_variance": "explained_variance",
            "train/loss": "loss", "train/learning_rate": "learning_rate", "train/std": "action_std",
            "train/ent_coef": "ent_coef", "train/clip_range": "clip_range",
        }
        for group, values in losses.items():
            for key, tag in names.items():
                if key in values:
                    self.tb.scalar(f"losses/{group}/{tag}", float(values[key]), step)
            for key, value in values.items():  # what extra losses logged
                if key.startswith(EXTRA_PREFIX):
                    self.tb.scalar(f"losses/{group}/{key[len(EXTRA_PREFIX):]}", float(value), step)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, path: Path, role: str = "teacher", config: dict[str, Any] | None = None) -> Path:
        """Save the team to a policy directory, with SB3's own ``.zip`` per group beside the safetensors."""
        extra = {f"{n}.zip": (lambda p, m=lr.model: m.save(p)) for n, lr in self.learners.items()}
        return save_team(path, self.team, self.spec, role, config=config, extra_files=extra, training=self._progress())

    def _progress(self) -> dict[str, int]:
        """What the saved policies were trained on: agent-steps (whole rollouts) and PPO iterations so far."""
        return {"agent_steps": self.agent_steps, "iterations": self.iteration}

    def save_checkpoint(self, path: Path) -> Path:
        """Save a resumable checkpoint (weights, normalisers, optimiser state, counters) to ``path``."""
        self._sync()  # a checkpoint holds every update of the data counted in agent_steps
        state = {
            "agent_steps": self.agent_steps,
            "iteration": self.iteration,
            "episode_seed": self.episode_seed,
            "optimizers": {n: lr.model.policy.optimizer.state_dict() for n, lr in self.learners.items()},
            "n_updates": {n: update_count(lr.model) for n, lr in self.learners.items()},
            "bonuses": {n: b.state_dict() for n, b in self.bonuses.items()},
        }
        extra = {STATE_FILE: lambda p: torch.save(state, p)}
        role = FINETUNE_CHECKPOINT if self.from_start else CHECKPOINT
        return save_team(path, self.team, self.spec, role, extra_files=extra, training=self._progress())

    def _restore(self, path: Path) -> None:
        team, manifest = load_team(path, self.venv.groups, device=self.device)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise MadistillError(f"{path} is not a training checkpoint (no {STATE_FILE}): resume from <run>/checkpoint")
        for name, net in manifest["networks"].items():
            saved = {**{k: net.get(k) for k in self.arch}, "team_state_dim": team_state_dim(net)}
            if saved != self.arch:
                critic = "central" if saved["team_state_dim"] else "local"
                raise MadistillError(f"checkpoint {path} has a {name} network with {saved}, not {self.arch}: resume with "
                                     f"teacher.hidden_sizes={saved['hidden_sizes']} teacher.activation={saved['activation']} "
                                     f"teacher.critic={critic}")
        try:
            state = torch.load(state_file, map_location=self.device, weights_only=True)
        except Exception as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise MadistillError(f"corrupt checkpoint state {state_file} ({why}); resume from another checkpoint") from e
        for name, lr in self.learners.items():
            load_model_state(lr.model, team[name].sb3.state_dict(), state["optimizers"][name], state["n_updates"][name])
            self.team.normalizers[name] = team.normalizers[name]
        self._copy_to_actors()
        saved_bonuses = state.get("bonuses", {})  # checkpoints from before teacher.message_bonus have none
        saved = {n: float(b["coef"]) for n, b in saved_bonuses.items()}
        if saved != {n: b.coef for n, b in self.bonuses.items()}:
            was = " ".join(f"+teacher.message_bonus.{n}={c}" for n, c in saved.items()) or "no teacher.message_bonus"
            log.warning(f"checkpoint {path} was trained with {was}; the resumed run changes the message bonus "
                        f"to {dict(OmegaConf.to_container(self.cfg.teacher.message_bonus))} from here on")
        for name, bonus in self.bonuses.items():
            if name in saved_bonuses:
                bonus.load_state_dict(saved_bonuses[name])
        self.agent_steps = int(state["agent_steps"])
        self.iteration = int(state["iteration"])
        if self.agent_steps >= self.total_agent_steps:
            raise MadistillError(f"checkpoint {path} is already at {self.agent_steps} agent-steps: raise "
                                 f"teacher.total_agent_steps above that to continue training")
        self.episode_seed = int(state.get("episode_seed", self.cfg.seed + self.iteration * self.venv.num_envs))
        if self.tb is not None:
            self.tb.continue_from(self.agent_steps)
        tqdm.write(f"resuming {path} at {self.agent_steps} of {self.total_agent_steps} agent-steps")


def _crossed(every: int, steps: int, per_iter: int) -> bool:
    """Whether the iteration that brought the count to ``steps`` crossed a multiple of ``every`` (0: never)."""
    return every > 0 and steps // every != (steps - per_iter) // every


def _start_arch(start: TeamPolicy) -> dict[str, Any]:
    """The one SB3 architecture of ``start``'s policies (the trainer builds every group's PPO alike)."""
    archs = [getattr(start[g.name], "arch", None) for g in start.groups]
    if not all(isinstance(start[g.name], SB3Policy) for g in start.groups) or any(a != archs[0] for a in archs):
        raise MadistillError("training can only continue from SB3 actor-critics of one architecture for every group")
    return dict(archs[0])
