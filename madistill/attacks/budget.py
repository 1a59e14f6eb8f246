"""Perturbation budgets in normalised observation units.

Policies read normalised observations, so an l_inf ball of radius eps there is a ball of eps times each
feature's standard deviation in raw units: one eps means the same on every feature. Features that must not
change (one-hot ids, a goal given by the env) are excluded: their radius is 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from madistill.errors import MadistillError
from madistill.explain.saliency import FeatureLayout


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
        if (r < 0).any():
            raise MadistillError("attack eps must be non-negative: fix attack.eps")
        r[list(excluded)] = 0.0
        return Budget(r)

    def scaled(self, factor: float) -> Budget:
        return Budget(self.radius * factor)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The nearest point of the ball around ``x``."""
        return torch.max(torch.min(x_adv, x + self.radius), x - self.radius)

    def sample(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A uniform draw from the ball around ``x``."""
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + (2 * u - 1) * self.radius


def excluded_features(spec: Sequence[int | str], layout: FeatureLayout) -> list[int]:
    """Feature indices from a config list of indices and/or feature-group names (e.g. ``message``)."""
    out: list[int] = []
    for item in spec:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            i = int(item)
            if not 0 <= i < layout.obs_dim:
                raise MadistillError(f"attack.exclude names feature {i}, observations have {layout.obs_dim}")
            out.append(i)
        elif item in layout.names:
            out.extend(layout.indices[layout.names.index(item)])
        else:
            raise MadistillError(f"attack.exclude names {item!r}: use feature indices or one of {list(layout.names)}")
    return sorted(set(out))


def group_budgets(
    eps: float | Sequence[float],
    layouts: Mapping[str, FeatureLayout],
    exclude: Mapping[str, Sequence[int | str]] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Budget]:
    """One Budget per agent group; ``exclude`` may be a config node (its lists are read as plain lists)."""
    exclude = {g: list(v) for g, v in (exclude or {}).items()}
    unknown = set(exclude) - set(layouts)
    if unknown:
        raise MadistillError(f"attack.exclude names groups {sorted(unknown)}; this env's groups are {sorted(layouts)}")
    return {
        g: Budget.build(eps, lay.obs_dim, excluded_features(exclude.get(g, ()), lay), device) for g, lay in layouts.items()
    }
