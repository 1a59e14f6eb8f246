"""Teacher training: SB3's PPO learns every group; madistill collects the multi-agent rollouts.

Each group gets one ``stable_baselines3.PPO`` whose "environments" are the group's agent slots in all env
copies (parameter sharing within the group). All groups act in the same envs through the shared rollout
loop; after each rollout every group's PPO runs its own ``train()`` (its losses, optimiser, clipping).

With ``teacher.overlap_update`` the groups act through copies of their policies, and each ``train()`` runs
in a background thread on one of two rollout buffers while the next rollout fills the other: the
environments (worker processes) and the update share the cores instead of taking turns. PyTorch and the
env pipes release the GIL, so the thread runs while the collector waits.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import VecEnv
from tqdm.auto import tqdm

from madistill.envs.episodes import EpisodeRecord
from madistill.envs.factory import EnvSpec
from madistill.envs.groups import AgentGroup
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies.base import TeamPolicy, log_prob
from madistill.policies.sb3 import SB3Policy, policy_kwargs, sb3_observation_space
from madistill.policies.store import load_team, save_team
from madistill.rollout import Rollout, Transition
from madistill.tb import TBLogger

STATE_FILE = "trainer_state.pt"


class _SpacesOnlyVecEnv(VecEnv):
    """Tells SB3's PPO the spaces and batch width to size its buffers for; madistill steps the real envs."""

    def __init__(self, num_envs: int, observation_space: spaces.Space, action_space: spaces.Space):
        super().__init__(num_envs, observation_space, action_space)

    def _unused(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("madistill collects rollouts itself; this placeholder env is never stepped")

    reset = step_async = step_wait = set_attr = env_method = _unused

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [None] * self.num_envs  # VecEnv.__init__ asks for render_mode

    def env_is_wrapped(self, wrapper_class: Any, indices: Any = None) -> list[bool]:
        return [False] * self.num_envs

    def close(self) -> None:
        pass


class MaskedRolloutBuffer(RolloutBuffer):
    """SB3's rollout buffer that samples only the entries where the agent was alive.

    Agents that terminated early (or are absent) still occupy a slot; their absorbing padding steps are
    stored but never reach PPO's losses.
    """

    rng: np.random.Generator | None = None  # minibatch order (None: numpy's global stream, as SB3's own buffer)

    def reset(self) -> None:
        super().reset()
        self.valid = np.zeros((self.buffer_size, self.n_envs), dtype=bool)

    def get(self, batch_size: int | None = None):  # type: ignore[override]
        assert self.full, "collect a full rollout before training"
        if not self.generator_ready:
            for name in ("observations", "actions", "values", "log_probs", "advantages", "returns"):
                self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])
            self.valid_idx = np.flatnonzero(self.swap_and_flatten(self.valid).ravel())
            self.generator_ready = True
        indices = (self.rng or np.random).permutation(self.valid_idx)
        batch_size = batch_size or len(indices)
        for start in range(0, len(indices), batch_size):
            yield self._get_samples(indices[start : start + batch_size])


@dataclass
class _GroupLearner:
    group: AgentGroup
    model: PPO
    actor: SB3Policy  # what acts in the envs: the learner's own policy, or a copy of it (overlap_update)
    buffers: list[MaskedRolloutBuffer]  # one, or two that the collector and the update swap (overlap_update)
    episode_starts: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def collecting(self) -> MaskedRolloutBuffer:
        return self.buffers[0]

    def hand_over(self) -> None:
        """Give the filled buffer to PPO's ``train()``; the collector takes the other one."""
        self.model.rollout_buffer = self.buffers[0]
        self.buffers.reverse()


class TeacherTrainer:
    """Trains one PPO per group together in one vector env; checkpointable and resumable."""

    def __init__(self, cfg: Any, venv: MultiAgentVecEnv, spec: EnvSpec, device: torch.device, tb: TBLogger | None):
        self.cfg, self.venv, self.spec, self.device, self.tb = cfg, venv, spec, device, tb
        tc = cfg.teacher
        self.arch = {"hidden_sizes": list(tc.hidden_sizes), "activation": tc.activation}
        ppo_kwargs = dict(tc.ppo)
        self.n_steps = int(ppo_kwargs["n_steps"])
        self.overlap = bool(tc.overlap_update)
        self.learners: dict[str, _GroupLearner] = {}
        normalizers = {}
        for gi, g in enumerate(venv.groups):
            width = venv.num_envs * g.n_agents
            if width * self.n_steps < 2:
                raise MadistillError("teacher.ppo.n_steps * env.num_envs must be at least 2")
            model = PPO(
                "MlpPolicy",
                _SpacesOnlyVecEnv(width, sb3_observation_space(g), g.action_space),
                rollout_buffer_class=MaskedRolloutBuffer,
                policy_kwargs=policy_kwargs(self.arch),
                seed=cfg.seed,
                device=device,
                **ppo_kwargs,
            )
            model.set_logger(Logger(folder=None, output_formats=[]))
            buffers, policy = [model.rollout_buffer], model.policy
            if self.overlap:
                buffers.append(copy.deepcopy(model.rollout_buffer))
                # its own minibatch-order stream, so the collector thread cannot shift the update's order
                model.rollout_buffer.rng = buffers[1].rng = np.random.default_rng([int(cfg.seed), gi])
                policy = copy.deepcopy(model.policy)
            actor = SB3Policy(g, policy, self.arch)
            self.learners[g.name] = _GroupLearner(g, model, actor, buffers, np.ones(width, dtype=np.float32))
            normalizers[g.name] = ObsNormalizer(g.obs_dim, enabled=tc.normalize_obs)
        self.team = TeamPolicy(venv.groups, {n: lr.actor for n, lr in self.learners.items()}, normalizers)
        self.agent_steps = 0
        self.iteration = 0
        self._pending: Future | None = None  # the update running in the background (overlap_update)
        if tc.resume:
            self._restore(Path(tc.resume))

    # ---- collection -------------------------------------------------------------------------
    def _on_step(self, tr: Transition) -> None:
        for name, lr in self.learners.items():
            g, model = lr.group, lr.model
            obs = tr.obs[name].reshape(-1, g.obs_dim)
            actions = tr.actions[name].reshape(obs.shape[0], *tr.actions[name].shape[2:])
            active = tr.active[name].reshape(-1).cpu().numpy()
            policy = self.team[name]
            with torch.no_grad():
                values = policy.value(obs)
                logp = log_prob(tr.dists[name], actions)
            res = tr.result
            rewards = res.rewards[name].reshape(-1).astype(np.float32).copy()
            trunc = res.truncated[name].reshape(-1)
            if trunc.any():  # time-limit ends are not real ends: bootstrap from the final observation
                final = torch.as_tensor(res.final_obs[name].reshape(-1, g.obs_dim)[trunc], device=self.device)
                with torch.no_grad():
                    v_final = policy.value(self.team.normalizers[name].normalize(final)).cpu().numpy()
                rewards[trunc] += model.gamma * v_final
            buf = lr.collecting
            buf.valid[buf.pos] = active
            buf.add(obs.cpu().numpy(), actions.cpu().numpy(), rewards, lr.episode_starts, values, logp)
            next_active = res.active[name].reshape(-1)
            lr.episode_starts = (res.dones[name].reshape(-1) | ~next_active).astype(np.float32)
            self.team.normalizers[name].update(tr.raw_obs[name].reshape(-1, g.obs_dim)[active])

    def _finish_rollout(self, rollout: Rollout) -> None:
        for name, lr in self.learners.items():
            raw = torch.as_tensor(rollout.raw_obs[name].reshape(-1, lr.group.obs_dim), device=self.device)
            with torch.no_grad():
                last_values = self.team[name].value(self.team.normalizers[name].normalize(raw))
            lr.collecting.compute_returns_and_advantage(last_values=last_values, dones=lr.episode_starts)

    # ---- training ----------------------------------------------------------------------------
    def train(self, run_dir: Path) -> TeamPolicy:
        """Train until ``teacher.total_agent_steps``; Ctrl-C saves a checkpoint and re-raises."""
        total = int(self.cfg.teacher.total_agent_steps)
        per_iter = self.n_steps * self.venv.num_envs * len(self.venv.possible_agents)
        every = int(self.cfg.teacher.checkpoint_every)
        rollout = Rollout(self.venv, self.team, seed=self.cfg.seed + self.iteration * self.venv.num_envs)
        bar = tqdm(
            total=total, initial=self.agent_steps, desc="train", unit="agent-step", unit_scale=True,
            disable=not self.cfg.logger.progress,
        )
        try:
            with bar, ThreadPoolExecutor(max_workers=1) as background:
                while self.agent_steps < total:
                    t0 = time.perf_counter()
                    for lr in self.learners.values():
                        lr.collecting.reset()
                        lr.actor.sb3.set_training_mode(False)  # SB3's train() leaves its policy in training mode
                    episodes = rollout.run(steps=self.n_steps, on_step=self._on_step)
                    self._finish_rollout(rollout)
                    t_collect = time.perf_counter() - t0
                    losses = self._sync()  # the previous update (overlap) must finish before this one starts
                    for lr in self.learners.values():
                        lr.hand_over()
                    if self.overlap:
                        self._pending = background.submit(self._update, total, self.agent_steps)
                    else:
                        losses = self._update(total, self.agent_steps)
                    self.agent_steps += per_iter
                    self.iteration += 1
                    dt = time.perf_counter() - t0
                    bar.update(per_iter)
                    if episodes:
                        bar.set_postfix(team_return=f"{np.mean([e.team_return for e in episodes]):.2f}")
                    self._log(episodes, losses, per_iter / dt, t_collect / dt)
                    if every and self.agent_steps // every != (self.agent_steps - per_iter) // every:
                        self.save_checkpoint(run_dir / "checkpoint")
        except KeyboardInterrupt:
            path = self.save_checkpoint(run_dir / "checkpoint")
            tqdm.write(f"interrupted: checkpoint saved to {path}; resume with teacher.resume={path}")
            raise
        self._sync()
        return self.team

    def _update(self, total: int, agent_steps: int) -> dict[str, dict[str, float]]:
        """One PPO ``train()`` per group on its handed-over buffer; returns SB3's logged losses."""
        losses = {}
        for name, lr in self.learners.items():
            model = lr.model
            model.num_timesteps = agent_steps
            model._current_progress_remaining = max(0.0, 1.0 - agent_steps / total)
            model.train()
            losses[name] = dict(model.logger.name_to_value)
            model.logger.dump(agent_steps)  # clears the values; the logger has no outputs
        return losses

    def _sync(self) -> dict[str, dict[str, float]]:
        """Wait for the background update, if any, and let the acting copies take its weights."""
        if self._pending is None:
            return {}
        losses, self._pending = self._pending.result(), None
        self._copy_to_actors()
        return losses

    def _copy_to_actors(self) -> None:
        """The acting copies (overlap_update) take the learners' weights; without copies they are the same."""
        if self.overlap:
            for lr in self.learners.values():
                lr.actor.sb3.load_state_dict(lr.model.policy.state_dict())

    def _log(self, episodes: list[EpisodeRecord], losses: dict[str, dict[str, float]], sps: float, collect_share: float) -> None:
        if self.tb is None:
            return
        step = self.agent_steps
        if episodes:
            self.tb.scalar("charts/episodic_return", np.mean([e.team_return for e in episodes]), step)
            self.tb.scalar("charts/episodic_length", np.mean([e.length for e in episodes]), step)
            for agent in self.venv.possible_agents:
                self.tb.scalar(f"charts/episodic_return/{agent}", np.mean([e.agent_returns[agent] for e in episodes]), step)
        self.tb.scalar("charts/SPS", sps, step)
        self.tb.scalar("charts/collect_time_share", collect_share, step)
        names = {
            "train/value_loss": "value_loss", "train/policy_gradient_loss": "policy_loss",
            "train/entropy_loss": "entropy_loss", "train/approx_kl": "approx_kl",
            "train/clip_fraction": "clipfrac", "train/explained_variance": "explained_variance",
            "train/loss": "loss", "train/learning_rate": "learning_rate", "train/std": "action_std",
        }
        for group, values in losses.items():
            for key, tag in names.items():
                if key in values:
                    self.tb.scalar(f"losses/{group}/{tag}", float(values[key]), step)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, path: Path, role: str = "teacher", config: dict[str, Any] | None = None) -> Path:
        """Save the team to a policy directory, with SB3's own ``.zip`` per group beside the safetensors."""
        extra = {f"{n}.zip": (lambda p, m=lr.model: m.save(p)) for n, lr in self.learners.items()}
        return save_team(path, self.team, self.spec, role, config=config, extra_files=extra)

    def save_checkpoint(self, path: Path) -> Path:
        self._sync()  # a checkpoint holds every update of the data counted in agent_steps
        state = {
            "agent_steps": self.agent_steps,
            "iteration": self.iteration,
            "optimizers": {n: lr.model.policy.optimizer.state_dict() for n, lr in self.learners.items()},
            "n_updates": {n: lr.model._n_updates for n, lr in self.learners.items()},
        }
        extra = {STATE_FILE: lambda p: torch.save(state, p)}
        return save_team(path, self.team, self.spec, "checkpoint", extra_files=extra)

    def _restore(self, path: Path) -> None:
        team, _ = load_team(path, self.venv.groups, device=self.device)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise MadistillError(f"{path} is not a training checkpoint (no {STATE_FILE}): resume from <run>/checkpoint")
        try:
            state = torch.load(state_file, map_location=self.device, weights_only=True)
        except Exception as e:
            raise MadistillError(f"corrupt checkpoint state {state_file} ({e}); resume from another checkpoint") from e
        for name, lr in self.learners.items():
            lr.model.policy.load_state_dict(team[name].sb3.state_dict())
            lr.model.policy.optimizer.load_state_dict(state["optimizers"][name])
            lr.model._n_updates = int(state["n_updates"][name])
            self.team.normalizers[name] = team.normalizers[name]
        self._copy_to_actors()
        self.agent_steps = int(state["agent_steps"])
        self.iteration = int(state["iteration"])
