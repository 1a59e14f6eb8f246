"""Feature groups of an agent group's observations: named sets of feature indices (e.g. a landmark's (x, y)), the
unit in which saliency is scored, attack budgets are scaled and features are excluded from attacks."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError


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
