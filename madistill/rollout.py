"""The one rollout loop: env -> normalise -> observation chain -> policies -> action chain -> env. Every stage
uses it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributions import Distribution
from tqdm.auto import tqdm

from madistill.envs.episodes import EpisodeRecord
from madistill.envs.vector import GroupArrays, MultiAgentVecEnv, VecStep
from madistill.policies.base import Generators, TeamPolicy, choose
from madistill.transforms import (
    ActionTransform,
    GroupTensors,
    ObsTransform,
    StepContext,
    apply_action_chain,
    apply_chain,
    normalize,
)


@dataclass
class Transition:
    """One step of all env copies, as seen by a stage's ``on_step`` hook."""

    raw_obs: GroupArrays  # observations as the env produced them [N, n_g, d]
    obs: GroupTensors  # what the policies saw: normalised, then transformed [N, n_g, d]
    active: GroupTensors  # [N, n_g] bool: agents that acted (others are absorbing padding)
    dists: dict[str, Distribution]  # each group's action distribution over its flat batch [N * n_g]
    actions: GroupTensors  # executed: [N, n_g] (Discrete) or [N, n_g, a] (Box), before clipping to bounds
    result: VecStep  # what the env returned
    intended: GroupTensors  # what the policies chose, before the action chain (the same tensors without one)
    episode_seeds: np.ndarray  # [N] the episode each copy played in this step
    episode_steps: np.ndarray  # [N] the step within that episode
    ended: np.ndarray  # [N] bool: that episode ended at this step (the copy has begun its next one)


def team_actions(
    team: TeamPolicy, obs: GroupTensors, deterministic: bool, generator: Generators
) -> tuple[dict[str, Distribution], GroupTensors]:
    """Each group's action distribution over its flat batch and its chosen actions ``[N, n_g, ...]``, for
    policy-ready (normalised, transformed) observations ``[N, n_g, d]`` of the groups in ``obs``: the one
    place a team acts."""
    dists, actions = {}, {}
    for g in (g for g in team.groups if g.name in obs):
        x = obs[g.name]
        n, k = x.shape[:2]
        d = team[g.name].dist(x.reshape(n * k, -1))
        a = choose(d, deterministic, generator)
        dists[g.name] = d
        actions[g.name] = a.reshape(n, k, *a.shape[1:])
    return dists, actions


def env_actions(team: TeamPolicy, actions: GroupTensors) -> GroupArrays:
    """Chosen actions (of the groups in ``actions``) as the arrays an env takes: on the CPU, Box actions
    clipped to their bounds."""
    out = {}
    for g in (g for g in team.groups if g.name in actions):
        a = actions[g.name].detach().cpu().numpy()
        if not g.discrete:  # Gaussian samples can leave the box; the env only accepts the box
            a = np.clip(a, g.action_space.low, g.action_space.high).astype(np.float32)
        out[g.name] = a
    return out


class Rollout:
    """Steps a team of policies in a vector env, continuing episodes across ``run`` calls."""

    def __init__(
        self,
        venv: MultiAgentVecEnv,
        team: TeamPolicy,
        transforms: Sequence[ObsTransform | ActionTransform] = (),
        deterministic: bool = False,
        seed: int = 0,
        episode_streams: bool = False,
    ):
        """``transforms``: observation transforms (applied in order before the policies act) and action
        transforms (applied in order to the chosen actions before the env steps), in one list.
        ``episode_streams``: sample each episode's actions from a stream seeded by its episode seed, so
        sampled evaluations do not depend on how many copies play them (costs one draw per copy and step)."""
        self.venv = venv
        self.team = team
        self.transforms = [t for t in transforms if isinstance(t, ObsTransform)]
        self.action_transforms = [t for t in transforms if isinstance(t, ActionTransform)]
        self.deterministic = deterministic
        self.generator = torch.Generator(device=team.device)
        self.copy_streams = (
            [torch.Generator(device=team.device) for _ in range(venv.num_envs)] if episode_streams else None
        )
        self.reset(seed)

    def reset(self, seed: int) -> None:
        """Restart every copy at episode seed ``seed + i`` and reseed action sampling."""
        self.seed = seed
        self.generator.manual_seed(seed)
        self.raw_obs, active = self.venv.reset(seed)
        self.active = {g: torch.as_tensor(a, device=self.team.device) for g, a in active.items()}
        self.episode_step = np.zeros(self.venv.num_envs, dtype=np.int64)
        self.steps = 0
        for t in (*self.transforms, *self.action_transforms):
            t.reset()
        self._start_episodes(np.arange(self.venv.num_envs))

    def _start_episodes(self, copies: np.ndarray) -> None:
        """These copies have just begun an episode (``venv.episode_seeds`` gives which)."""
        self.playing = self.venv.episode_seeds.copy()
        self.episode_step[copies] = 0
        for i in copies if self.copy_streams is not None else ():
            self.copy_streams[i].manual_seed(int(self.playing[i]))
        if len(copies):
            for t in (*self.transforms, *self.action_transforms):
                t.start_episodes(copies, self.playing[copies])

    def step(self) -> Transition:
        """Advance every copy by one env step."""
        ctx = StepContext(self.team, self.steps, self.episode_step, self.active, self.generator, self.playing)
        obs = apply_chain(self.transforms, normalize(self.team, self.raw_obs), ctx)
        with torch.no_grad():
            dists, intended = team_actions(self.team, obs, self.deterministic, self.copy_streams or self.generator)
            actions = apply_action_chain(self.action_transforms, intended, dists, ctx)
        result = self.venv.step(env_actions(self.team, actions))
        # _start_episodes replaces self.playing (never writes into it); episode_step is advanced in place
        seeds, steps, raw_obs, active = self.playing, self.episode_step.copy(), self.raw_obs, self.active
        self.raw_obs = result.obs
        self.active = {g: torch.as_tensor(a, device=self.team.device) for g, a in result.active.items()}
        self.steps += 1
        self.episode_step += 1
        self._start_episodes(np.flatnonzero(self.venv.episode_seeds != self.playing))
        return Transition(raw_obs, obs, active, dists, actions, result, intended, seeds, steps, self.playing != seeds)

    def run(
        self,
        steps: int | None = None,
        episodes: int | None = None,
        on_step: Callable[[Transition], None] | None = None,
        progress: str | None = None,
    ) -> list[EpisodeRecord]:
        """Run ``steps`` more vector steps, or until the episodes with seeds ``seed .. seed+episodes-1`` finish.

        Returns the finished episodes (for ``episodes=n``: exactly those n, ordered by seed).
        ``progress`` is a label for a progress bar (None: no bar).
        """
        if (steps is None) == (episodes is None):
            raise ValueError("give exactly one of steps= or episodes=")
        done: list[EpisodeRecord] = []
        wanted = set(range(self.seed, self.seed + episodes)) if episodes is not None else set()
        bar = tqdm(total=steps or episodes, desc=progress, unit="step" if steps else "ep", disable=progress is None)
        taken = 0
        with bar:
            while True:
                tr = self.step()
                if on_step is not None:
                    on_step(tr)
                new = [e for e in tr.result.episodes if episodes is None or e.seed in wanted]
                done.extend(new)
                taken += 1
                if steps is not None:
                    bar.update(1)
                    if taken >= steps:
                        break
                else:
                    bar.update(len(new))
                    wanted.difference_update(e.seed for e in new)
                    if not wanted:
                        break
        return sorted(done, key=lambda e: e.seed) if episodes is not None else done
