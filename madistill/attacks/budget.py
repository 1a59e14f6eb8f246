"""Perturbation budgets in normalised observation units.

Policies read normalised observations, so an l_inf ball of radius eps there is a ball of eps times each
feature's standard deviation in raw units: one eps means the same on every feature. Features that must not
change (one-hot ids, a goal given by the env) are excluded: their radius is 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from madistill.envs.features import FeatureLayout
from madistill.errors import MadistillError


@dataclass(frozen=True)
class Budget:
    """Per-feature l_inf radius ``[d]`` (0 on excluded features)."""

    radius: torch.Tensor

    @staticmethod
    def build(eps: float | Sequence[float], obs_dim: int, excluded: Sequence[int] = (), device: torch.device | str = "cpu") -> Budget:
        """``eps``: one radius for every feature or one per feature; ``excluded``: feature indices kept fixed."""
        r = torch.as_tensor(eps, dtype=torch.float32, device=device)
        r = r.expand(obs_dim).clone() if r.dim() == 0 else r.clone()
        if r.shape != (obs_dim,):
            raise MadistillError(f"a per-feature eps needs {obs_dim} values, got {tuple(r.shape)}: fix attack.eps")
        r[list(excluded)] = 0.0
        return Budget(r)

    def scaled(self, factor: float) -> Budget:
        return Budget(self.radius * factor)

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ball around ``x`` as its lowest and highest point per feature (a search stepping many times around
        the same ``x`` computes them once)."""
        return x - self.radius, x + self.radius

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The nearest point of the ball around ``x``."""
        return torch.clamp(x_adv, *self.bounds(x))

    def sample(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A uniform draw from the ball around ``x``."""
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + (2 * u - 1) * self.radius


def excluded_features(spec: Sequence[int | str], layout: FeatureLayout, key: str = "attack.exclude") -> list[int]:
    """Feature indices from a config list of indices and/or feature-group names (e.g. ``message``); ``key``
    names the setting in errors."""
    out: list[int] = []
    for item in spec:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            i = int(item)
            if not 0 <= i < layout.obs_dim:
                raise MadistillError(f"{key} names feature {i}, observations have {layout.obs_dim}")
            out.append(i)
        elif item in layout.names:
            out.extend(layout.indices[layout.names.index(item)])
        else:
            raise MadistillError(f"{key} names {item!r}: use feature indices or one of {list(layout.names)}")
    return sorted(set(out))


def group_budgets(
    eps: float,
    layouts: Mapping[str, FeatureLayout],
    exclude: Mapping[str, Sequence[int | str]] | None = None,
    device: torch.device | str = "cpu",
    scale: Mapping[str, Mapping[int | str, float]] | None = None,
) -> dict[str, Budget]:
    """One Budget per agent group: radius ``eps`` on every feature, times ``scale[group][feature]`` where given
    (a per-feature eps), 0 on ``exclude[group]``. Both may be config nodes."""
    exclude = {g: list(v) for g, v in (exclude or {}).items()}
    scale = {g: dict(v) for g, v in (scale or {}).items()}
    for key, named in (("attack.exclude", exclude), ("attack.scale", scale)):
        unknown = set(named) - set(layouts)
        if unknown:
            raise MadistillError(f"{key} names groups {sorted(unknown)}; this env's groups are {sorted(layouts)}")
    budgets = {}
    for g, lay in layouts.items():
        radius = torch.full((lay.obs_dim,), float(eps))
        for feature, factor in scale.get(g, {}).items():
            radius[excluded_features([feature], lay, "attack.scale")] *= float(factor)
        budgets[g] = Budget.build(radius.tolist(), lay.obs_dim, excluded_features(exclude.get(g, ()), lay), device)
    return budgets
