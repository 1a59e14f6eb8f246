"""Saliency of a policy's decision w.r.t. its (normalised) observation features.

Two methods, both written against the Policy interface:

- **perturbation saliency** (the teacher's labels in DIGR): feature group i matters as much as the policy's
  head moves when i is replaced by an in-distribution baseline, ``1/2 ||f(x) - f(x with x_i := b_i)||^2``;
  all perturbed copies go through one forward pass.
- **gradient saliency** (cheap, what a DIGR student is trained to make faithful): ``|d f_S(x) / d x|`` from
  one backward pass, where ``f_S`` is the log-probability of an action (or its logit / Gaussian mean).

Scores are aggregated to *feature groups* (e.g. an (x, y) pair) and normalised to [0, 1] per observation.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.policies.base import Policy, choose, log_prob

TARGETS = ("log_prob", "logit")


@dataclass(frozen=True)
class FeatureLayout:
    """Named groups of observation features, e.g. ``landmark_0 = [2, 3]``; every feature in exactly one."""

    names: tuple[str, ...]
    indices: tuple[tuple[int, ...], ...]
    obs_dim: int

    @staticmethod
    def build(
        obs_dim: int, groups: Mapping[str, Sequence[int]] | None = None, feature_names: Sequence[str] | None = None
    ) -> FeatureLayout:
        """Groups from config (name -> feature indices); features no group names stay single, named by
        ``feature_names`` where the env gives them, else ``f<i>``."""
        groups = dict(groups or {})
        seen: dict[int, str] = {}
        for name, idx in groups.items():
            for i in idx:
                if not 0 <= int(i) < obs_dim:
                    raise MadistillError(
                        f"feature group {name!r} names feature {i}, but observations have {obs_dim} features: "
                        "fix env.features"
                    )
                if int(i) in seen:
                    raise MadistillError(f"feature {i} is in groups {seen[int(i)]!r} and {name!r}: fix env.features")
                seen[int(i)] = name
        first = {name: min(int(i) for i in idx) for name, idx in groups.items() if len(idx)}
        entries = [(pos, name, tuple(sorted(int(i) for i in groups[name]))) for name, pos in first.items()]
        for i in range(obs_dim):
            if i not in seen:
                label = feature_names[i] if feature_names is not None and i < len(feature_names) else f"f{i}"
                entries.append((i, label, (i,)))
        entries.sort()
        return FeatureLayout(tuple(e[1] for e in entries), tuple(e[2] for e in entries), obs_dim)

    def __len__(self) -> int:
        return len(self.names)

    def membership(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[G, d]`` 0/1 matrix: row g marks the features of group g. Built once per layout and device
        (every DIGR minibatch asks for it); shared, so callers must not modify it in place."""
        return _membership(self, torch.device(device))


@functools.lru_cache(maxsize=64)
def _membership(layout: FeatureLayout, device: torch.device) -> torch.Tensor:
    m = torch.zeros(len(layout), layout.obs_dim)
    for g, idx in enumerate(layout.indices):
        m[g, list(idx)] = 1.0
    return m.to(device)


def image_patches(group: AgentGroup, patch: int) -> dict[str, list[int]]:
    """Feature groups of an image group's flattened observations: squares of ``patch`` pixels (fewer at the
    right and bottom edges) with all their channels, named ``patch_<row>_<col>``; empty for other groups."""
    if group.image_shape is None:
        return {}
    if patch < 1:
        raise MadistillError(f"saliency.image_patch must be at least 1, got {patch}")
    c, h, w = group.image_shape
    index = np.arange(group.obs_dim)
    # flat position of each (y, x, channel): the observation is flattened from (H, W, C), or (C, H, W)
    pixels = index.reshape(c, h, w).transpose(1, 2, 0) if group.channels_first else index.reshape(h, w, c)
    return {f"patch_{r}_{q}": sorted(pixels[y : y + patch, x : x + patch].ravel().tolist())
            for r, y in enumerate(range(0, h, patch)) for q, x in enumerate(range(0, w, patch))}


def feature_layouts(
    groups: Sequence[AgentGroup],
    configured: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
    feature_names: Mapping[str, Sequence[str] | None] | None = None,
    image_patch: int = 1,
) -> dict[str, FeatureLayout]:
    """One FeatureLayout per agent group, from ``env.features`` and the env's own feature names; image groups
    that ``env.features`` leaves out are grouped into patches of ``image_patch`` pixels (``saliency.image_patch``)."""
    configured = configured or {}
    unknown = set(configured) - {g.name for g in groups}
    if unknown:
        raise MadistillError(
            f"env.features names groups {sorted(unknown)} this env lacks; its groups are {[g.name for g in groups]}"
        )
    names = feature_names or {}
    return {g.name: FeatureLayout.build(g.obs_dim, configured.get(g.name) or image_patches(g, image_patch),
                                        names.get(g.name)) for g in groups}


def normalise_rows(s: torch.Tensor) -> torch.Tensor:
    """Scale each row to max 1 (rows that are all zero stay zero)."""
    return s / s.amax(-1, keepdim=True).clamp_min(1e-12)


def perturbation_saliency(
    policy: Policy,
    obs: torch.Tensor,
    layout: FeatureLayout,
    baselines: torch.Tensor | None = None,
    clean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-group perturbation saliency ``[B, G]`` in [0, 1] for normalised observations ``obs [B, d]``.

    ``baselines``: replacement values, ``[d]`` (one baseline, e.g. the normaliser mean, which is 0 in
    normalised units: the default), or ``[K, B, d]`` (K draws per observation, e.g. other observations from
    the data: the marginal baseline); scores are averaged over the K draws. ``clean``: the policy's head on
    ``obs`` when the caller already has it (only the perturbed copies are then run).
    """
    b, d = obs.shape
    if baselines is None:
        baselines = torch.zeros(d, device=obs.device)
    draws = baselines.expand(1, b, d) if baselines.dim() == 1 else baselines
    k, g = draws.shape[0], len(layout)
    member = layout.membership(obs.device).bool()  # [G, d]
    # copies[k, b, g] = obs[b] with group g's features replaced by draw k: one forward over all of them
    copies = torch.where(member[None, None], draws[:, :, None, :], obs[None, :, None, :])
    with torch.no_grad():
        if clean is None:
            heads = policy(torch.cat([obs, copies.reshape(-1, d)]))
            clean, perturbed = heads[:b], heads[b:]
        else:
            perturbed = policy(copies.reshape(-1, d))
    perturbed = perturbed.reshape(k, b, g, -1)
    scores = 0.5 * (perturbed - clean[None, :, None, :]).pow(2).sum(-1).mean(0)
    return normalise_rows(scores)


def gradient_saliency(
    policy: Policy,
    obs: torch.Tensor,
    actions: torch.Tensor | None = None,
    target: str = "log_prob",
    layout: FeatureLayout | None = None,
) -> torch.Tensor:
    """``|d f(x) / d x|`` for a batch in one backward pass: ``[B, d]``, or ``[B, G]`` per feature group
    (the gradient's L2 norm over the group) when ``layout`` is given; normalised to [0, 1] per row.

    ``f`` is the log-probability (``target="log_prob"``) or the logit / mean component (``"logit"``) of
    ``actions``; by default the policy's own greedy actions, i.e. "why does it do what it does".
    """
    x = obs.detach().requires_grad_(True)
    with torch.enable_grad():
        head = policy(x)
        if actions is None:
            actions = choose(policy.dist_from_head(head.detach()), deterministic=True, generator=None)
        f = decision_value(policy, head, actions, target)
        (grad,) = torch.autograd.grad(f.sum(), x)
    return normalise_rows(group_norms(grad, layout))


def decision_value(policy: Policy, head: torch.Tensor, actions: torch.Tensor, target: str) -> torch.Tensor:
    """``f(x)`` per sample whose input gradient is explained: log pi(a|x), or the logit / mean of ``a``.

    Samples are independent, so ``grad(f.sum(), x)`` gives every sample's own input gradient at once.
    """
    if target not in TARGETS:
        raise MadistillError(f"unknown saliency target {target!r}: use one of {TARGETS}")
    if policy.group.discrete:
        if target == "logit":
            return head.gather(-1, actions.long().reshape(-1, 1)).squeeze(-1)
        return torch.log_softmax(head, -1).gather(-1, actions.long().reshape(-1, 1)).squeeze(-1)
    if target == "logit":  # Box: the mean itself, summed over action components
        return head.sum(-1)
    return log_prob(policy.dist_from_head(head), actions)


def group_norms(per_feature: torch.Tensor, layout: FeatureLayout | None) -> torch.Tensor:
    """Aggregate per-feature gradients ``[B, d]`` to per-group L2 norms ``[B, G]`` (abs when no layout)."""
    if layout is None:
        return per_feature.abs()
    return (per_feature.pow(2) @ layout.membership(per_feature.device).T).sqrt()


@dataclass
class SaliencyLabeller:
    """Labels observations with the teacher's perturbation saliency, with a mean or marginal baseline."""

    layouts: Mapping[str, FeatureLayout]
    baseline: str = "mean"  # mean: the normaliser mean (0 in normalised units); marginal: other observations
    samples: int = 4  # marginal draws per observation
    chunk: int = 4096  # observations per batched forward (bounds memory: chunk * (G + 1) * samples rows) ...
    max_values: int = 2**25  # ... and fewer where their perturbed copies would hold more values (image groups)
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def __post_init__(self) -> None:
        if self.baseline not in ("mean", "marginal"):
            raise MadistillError(f"unknown saliency.baseline {self.baseline!r}: use saliency.baseline=mean or marginal")

    @staticmethod
    def from_config(sc: Any, layouts: Mapping[str, FeatureLayout], seed: int) -> SaliencyLabeller:
        """From ``cfg.saliency``, its marginal draws seeded with the run's seed."""
        return SaliencyLabeller(layouts, sc.baseline, sc.baseline_samples, generator=torch.Generator().manual_seed(seed))

    def __call__(self, policy: Policy, group: str, obs: torch.Tensor, pool: torch.Tensor | None = None) -> torch.Tensor:
        """Saliency ``[M, G]`` of ``policy`` on ``obs``; marginal draws come from ``pool`` (default ``obs``)."""
        return self.heads_and_saliency(policy, group, obs, pool)[1]

    def heads_and_saliency(
        self, policy: Policy, group: str, obs: torch.Tensor, pool: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's heads ``[M, act_dim]`` on ``obs`` and their saliency ``[M, G]``: one clean forward each."""
        layout = self.layouts[group]
        pool = obs if pool is None else pool
        heads, scores = [], []
        copies = (self.samples if self.baseline == "marginal" else 1) * len(layout) * layout.obs_dim
        chunk = max(1, min(self.chunk, self.max_values // copies))
        for start in range(0, len(obs), chunk):
            x = obs[start : start + chunk]
            base = None
            if self.baseline == "marginal":
                idx = torch.randint(len(pool), (self.samples, len(x)), generator=self.generator)
                base = pool[idx.to(pool.device)]
            with torch.no_grad():
                heads.append(policy(x))
            scores.append(perturbation_saliency(policy, x, layout, base, clean=heads[-1]))
        if not heads:
            return obs.new_zeros(0, policy.group.act_dim), obs.new_zeros(0, len(layout))
        return torch.cat(heads), torch.cat(scores)
