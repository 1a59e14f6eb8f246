"""Paired counterfactual rollouts: every episode played clean and under each fault, side by side.

One vector env holds ``(F + 1) * E`` copies with seed period ``E``: block 0 plays episodes ``seed ..
seed + E - 1`` clean, block ``f`` (1..F) the same episodes under fault ``f``. With the same action-sampling
stream per episode (``episode_streams``, seeded by the episode seed), the twins act identically until the fault
acts, so every difference after it is the fault's effect. Only each copy's first episode is measured. A study
of more copies than ``max_copies`` plays its episodes in rounds of equal size, one env reset for each, which
bounds memory (each PettingZoo copy is a whole env) and gives the same numbers: every draw comes from its
episode's own stream, the env resets to its seed, and the policy computes each row alike whatever the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributions import Categorical, Distribution
from tqdm import tqdm

from madistill.cascade.faults import Fault
from madistill.common.divergences import divergence
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.policies.base import TeamPolicy
from madistill.rollout import Rollout, Transition

MakeVenv = Callable[[int, int], MultiAgentVecEnv]  # (num_envs, seed_period) -> a vector env of the studied env
Watch = Callable[[Transition, np.ndarray], None]  # (transition, [N] bool: the copies whose episode is measured)


@dataclass
class PairedRun:
    """Per fault f, episode e, episode step t and agent a, faulted twin against clean twin. Entries are NaN
    where either twin's episode is over or the agent is not acting in both."""

    agents: list[str]  # agent ids, the last axis of every array
    seeds: np.ndarray  # [E] episode seeds
    onsets: np.ndarray  # [F, E] each fault's onset step in each episode
    tv: np.ndarray  # [F, E, T, A] total variation between the twins' action distributions
    kl: np.ndarray  # [F, E, T, A] KL(clean || faulted) between them
    disagree: np.ndarray  # [F, E, T, A] 1 where the twins' chosen (intended) actions differ, else 0
    reward_delta: np.ndarray  # [F, E, T, A] faulted reward - clean reward
    returns: np.ndarray  # [F + 1, E, A] episode returns, block 0 clean
    lengths: np.ndarray  # [F + 1, E] episode lengths, block 0 clean


def _heads(dist: Distribution) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, None) of a Categorical; (mean, log std) of a Box distribution."""
    if isinstance(dist, Categorical):
        return dist.logits, None
    return dist.mean, dist.stddev.log()


def pair_divergences(dist: Distribution, rows: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TV and KL(clean || faulted) ``[blocks - 1, rows]`` between each faulted block's rows and block 0's, for a
    distribution over ``blocks * rows`` rows. Box: diagonal Gaussians with equal spread (the policies' std does not
    depend on the observation), whose TV is exact: ``2 Phi(d / 2) - 1`` for the Mahalanobis distance d of the means."""
    head, log_std = _heads(dist)
    head = head.reshape(blocks, rows, -1)
    clean, faulted = head[:1].expand(blocks - 1, -1, -1), head[1:]
    flat = (clean.reshape(-1, head.shape[-1]), faulted.reshape(-1, head.shape[-1]))
    if log_std is None:
        kl = divergence("kl", *flat, discrete=True)
        tv = 0.5 * (clean.softmax(-1) - faulted.softmax(-1)).abs().sum(-1)
    else:
        ls = log_std.reshape(blocks, rows, -1)
        kl = divergence("kl", *flat, discrete=False, teacher_log_std=ls[:1].expand_as(clean).reshape(flat[0].shape),
                        student_log_std=ls[1:].reshape(flat[0].shape))
        d = ((clean - faulted) / ls[:1].exp()).norm(dim=-1)
        tv = torch.special.erf(d / (2 * 2**0.5))  # 2 Phi(d / 2) - 1
    return tv, kl.reshape(blocks - 1, rows)


class _Recorder:
    """Accumulates the paired measures of one rollout step by step, while each copy plays its first episode."""

    def __init__(self, team: TeamPolicy, agents: list[str], blocks: int, episodes: int):
        self.team, self.agents, self.blocks, self.episodes = team, agents, blocks, episodes
        self.col = {g.name: [agents.index(a) for a in g.agents] for g in team.groups}
        n = blocks * episodes
        self.steps: list[dict[str, np.ndarray]] = []
        self.live = np.ones(n, dtype=bool)  # copy still in its first episode
        self.returns = np.zeros((n, len(agents)))
        self.lengths = np.zeros(n, dtype=np.int64)

    def __call__(self, tr: Transition) -> None:
        b, e, a = self.blocks, self.episodes, len(self.agents)
        out = {k: np.full((b - 1, e, a), np.nan) for k in ("tv", "kl", "disagree", "reward_delta")}
        live = self.live.reshape(b, e)
        for g in self.team.groups:
            cols, n_g = self.col[g.name], g.n_agents
            tv, kl = pair_divergences(tr.dists[g.name], e * n_g, b)
            act = tr.intended[g.name].reshape(b, e, n_g, -1)
            active = tr.active[g.name].reshape(b, e, n_g).cpu().numpy()
            reward = tr.result.rewards[g.name].reshape(b, e, n_g)
            both = active[1:] & active[:1] & live[1:, :, None] & live[:1, :, None]
            for key, value in (("tv", tv.reshape(b - 1, e, n_g).cpu().numpy()),
                               ("kl", kl.reshape(b - 1, e, n_g).cpu().numpy()),
                               ("disagree", (act[1:] != act[:1]).any(-1).cpu().numpy().astype(float)),
                               ("reward_delta", reward[1:] - reward[:1])):
                out[key][:, :, cols] = np.where(both, value, np.nan)
            acted = (active & live.reshape(b, e, 1)).reshape(b * e, n_g)
            self.returns[:, cols] += np.where(acted, tr.result.rewards[g.name].reshape(b * e, n_g), 0.0)
        self.lengths += self.live
        self.steps.append(out)


def paired_rollouts(
    make_venv: MakeVenv,
    team: TeamPolicy,
    faults: Sequence[Fault | None],
    episodes: int,
    seed: int,
    deterministic: bool = False,
    watch: Watch | None = None,
    independent: bool = False,
    max_copies: int | None = None,
    progress: str | None = None,
) -> PairedRun:
    """Play episodes ``seed .. seed + episodes - 1`` clean and under each of ``faults`` side by side (one block
    of copies each; None: a second clean twin), and return their paired measures. Each fault is armed on its
    block only (onset -1 for a clean twin). ``watch``: called after every step of the paired rollout with the
    transition and the copies whose episode is measured (an alert monitor's ``observe``). ``independent``: the second
    clean twins (None) sample their actions from streams of their own instead of the clean block's, so they differ
    by sampling alone (``noise_floor``). ``max_copies``: the most env copies stepped side by side (None: all
    ``(len(faults) + 1) * episodes``); more episodes play in rounds of equal size, with the same numbers, since
    every copy draws from its episode's own streams (refused for a fault drawing from the stream copies share).
    ``progress``: the label of a progress bar over the episodes (None: no bar)."""
    blocks = len(faults) + 1
    rounds = _rounds(faults, episodes, max_copies)
    per = -(-episodes // rounds)  # episodes per round; the last round's extra ones are played, not measured
    bar = tqdm(total=episodes, desc=progress, unit="ep", disable=progress is None)
    with bar, make_venv(blocks * per, per) as venv:
        for f, fault in enumerate(faults):
            if fault is not None:
                fault.armed = np.repeat(np.arange(blocks) == f + 1, per)
        chain = [f for f in faults if f is not None]
        rollout = Rollout(venv, team, chain, deterministic=deterministic, seed=seed, episode_streams=True)
        parts = []
        for r in range(rounds):
            if r:
                rollout.reset(seed + r * per)
            parts.append(_paired_round(rollout, faults, min(per, episodes - r * per), watch, independent, bar))
    return _joined(parts)


def _rounds(faults: Sequence[Fault | None], episodes: int, max_copies: int | None) -> int:
    """In how many rounds ``paired_rollouts`` plays ``episodes`` with at most ``max_copies`` copies at once."""
    blocks = len(faults) + 1
    if max_copies is None or blocks * episodes <= max_copies:
        return 1
    shared = next((f for f in faults if f is not None and f.shared_stream), None)
    if shared is not None:
        fewer = (f"play at most {max_copies // blocks} episodes or raise cascade.max_copies" if max_copies >= blocks
                 else f"raise cascade.max_copies to {blocks * episodes}")
        raise MadistillError(
            f"{blocks} blocks x {episodes} episodes = {blocks * episodes} env copies exceed cascade.max_copies="
            f"{max_copies}, and fault {shared.name!r} draws from a stream all copies share, so the episodes must play "
            f"at once: {fewer}")
    return -(-episodes // max(1, max_copies // blocks))


def _paired_round(rollout: Rollout, faults: Sequence[Fault | None], measured: int, watch: Watch | None,
                  independent: bool, bar: tqdm) -> PairedRun:
    """One round of ``paired_rollouts`` on the rollout just reset: each block's first ``measured`` copies play
    their first episode, measured (the rest of a block's copies are played and dropped). ``bar`` counts the
    episodes whose every twin has ended."""
    blocks, agents = len(faults) + 1, list(rollout.venv.possible_agents)
    per = rollout.venv.num_envs // blocks
    start = rollout.playing.copy()
    # the k-th second clean twin's streams are seeded by (episode seed, k): the same wherever its block sits
    twins = [f + 1 for f, fault in enumerate(faults) if fault is None] if independent else []
    for k, b in enumerate(twins, 1):
        for i in range(b * per, (b + 1) * per):  # only each copy's first episode is measured
            state = np.random.SeedSequence([int(start[i]), k]).generate_state(1)[0]
            rollout.copy_streams[i].manual_seed(int(state))  # type: ignore[index]
    onsets = np.full((len(faults), per), -1, dtype=np.int64)
    for f, fault in enumerate(faults):
        if fault is not None:
            onsets[f] = fault.onset_at[(f + 1) * per:(f + 2) * per]
    rec = _Recorder(rollout.team, agents, blocks, per)
    rec.live &= np.tile(np.arange(per) < measured, blocks)
    bar_start = bar.n
    while rec.live.any():
        tr = rollout.step()
        rec(tr)
        if watch is not None:
            watch(tr, rec.live)
        rec.live &= rollout.playing == start
        bar.update(int((~rec.live.reshape(blocks, per)[:, :measured]).all(0).sum()) - (bar.n - bar_start))
    stacked = {k: np.stack([s[k] for s in rec.steps], axis=2)[:, :measured] for k in rec.steps[0]}
    return PairedRun(agents, start[:measured].copy(), onsets[:, :measured], stacked["tv"], stacked["kl"],
                     stacked["disagree"], stacked["reward_delta"], rec.returns.reshape(blocks, per, -1)[:, :measured],
                     rec.lengths.reshape(blocks, per)[:, :measured])


def _joined(parts: Sequence[PairedRun]) -> PairedRun:
    """The paired runs of consecutive rounds as one, their steps padded with NaN to the longest round's."""
    if len(parts) == 1:
        return parts[0]
    steps = max(p.tv.shape[2] for p in parts)

    def cat(name: str) -> np.ndarray:
        return np.concatenate([np.pad(getattr(p, name), [(0, 0), (0, 0), (0, steps - p.tv.shape[2]), (0, 0)],
                                      constant_values=np.nan) for p in parts], axis=1)

    return PairedRun(parts[0].agents, np.concatenate([p.seeds for p in parts]),
                     np.concatenate([p.onsets for p in parts], axis=1), cat("tv"), cat("kl"), cat("disagree"),
                     cat("reward_delta"), np.concatenate([p.returns for p in parts], axis=1),
                     np.concatenate([p.lengths for p in parts], axis=1))


def noise_floor(run: PairedRun, block: int, quantile: float) -> float:
    """The ``quantile`` of the per-episode and per-agent largest TV in fault block ``block`` of ``run``, a second
    clean twin sampling from streams of its own (``paired_rollouts(independent=True)``): how far an agent's action
    distribution strays from its clean twin's by sampling alone, with no fault."""
    return float(np.quantile(np.nan_to_num(run.tv[block], nan=0.0).max(axis=1), quantile))


# The action-distribution distance that twins with identical observations can show: the matrix kernels round a
# batch row by its position, so one input gives outputs an ulp apart in different rows (a policy's logits move by
# ~1e-7, its distributions' total variation by less).
ROUNDING_TV = 1e-5
# The reward difference twins can show, relative to the largest return of the replay: with Box actions that
# rounding moves the sampled action itself, and the env's rewards follow it in their last bits.
ROUNDING_REWARD = 1e-6


def check_reproducible(make_venv: MakeVenv, team: TeamPolicy, episodes: int, seed: int, env_id: str,
                       deterministic: bool = False) -> PairedRun:
    """Play ``episodes`` clean episodes twice side by side; refuse, in one line, an env whose episodes are not
    reproducible from their seed (the twins must take the same rewards and episode lengths, and their action
    distributions agree up to rounding, ``ROUNDING_TV``, and so do their rewards, ``ROUNDING_REWARD``). Returns the
    replay (its lengths bound onsets)."""
    run = paired_rollouts(make_venv, team, [None], episodes, seed, deterministic)
    atol = ROUNDING_REWARD * max(1.0, float(np.abs(run.returns).max()))
    diff = (np.nan_to_num(run.tv[0], nan=0.0) > ROUNDING_TV) | (np.abs(np.nan_to_num(run.reward_delta[0], nan=0.0)) > atol)
    lengths = run.lengths[0] != run.lengths[1]
    if diff.any() or lengths.any() or not np.allclose(run.returns[0], run.returns[1], rtol=0.0, atol=atol * run.lengths.max()):
        e, t, a = np.argwhere(diff)[0].tolist() if diff.any() else [int(np.argmax(lengths)), 0, 0]
        raise MadistillError(
            f"env {env_id!r} is not reproducible from its seed: episode {int(run.seeds[e])} played twice differs for "
            f"{run.agents[a]!r} at step {t}; the cascade monitor compares twins of one episode, so the env must draw "
            "all its randomness from the seed given to reset()")
    return run
