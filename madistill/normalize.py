"""Per-group observation normaliser: attack budgets and saliency baselines live in its units."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class ObsNormalizer:
    """Running mean/variance of one group's observations (parallel Welford), frozen after training.

    ``normalize(x) = clip((x - mean) / sqrt(var + eps), -clip, clip)``. Features that never vary keep
    ``var = 0`` and map to 0, so a constant one-hot id cannot blow up.
    """

    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8, enabled: bool = True):
        self.mean = np.zeros(dim, dtype=np.float64)
        self.var = np.ones(dim, dtype=np.float64)
        self.count = 0.0
        self.clip = float(clip)
        self.eps = float(eps)
        self.enabled = enabled
        self._cache: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    @property
    def std(self) -> np.ndarray:
        """Per-feature scale of one normalised unit (1 when disabled)."""
        return np.sqrt(self.var + self.eps) if self.enabled else np.ones_like(self.mean)

    def update(self, x: np.ndarray) -> None:
        """Fold a batch ``[B, dim]`` into the statistics (Chan et al. parallel variance)."""
        if not self.enabled or len(x) == 0:
            return
        x = np.asarray(x, dtype=np.float64)
        b_mean, b_var, b = x.mean(0), x.var(0), float(len(x))
        total = self.count + b
        delta = b_mean - self.mean
        self.mean = self.mean + delta * b / total
        m2 = self.var * self.count + b_var * b + delta**2 * self.count * b / total
        self.var = m2 / total
        self.count = total
        self._cache = None

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != device:
            mean = torch.as_tensor(self.mean, dtype=torch.float32, device=device)
            std = torch.as_tensor(self.std, dtype=torch.float32, device=device)
            self._cache = (device, mean, std)
        return self._cache[1], self._cache[2]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        mean, std = self._stats(x.device)
        return torch.clamp((x - mean) / std, -self.clip, self.clip)

    def state_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean.tolist(),
            "var": self.var.tolist(),
            "count": self.count,
            "clip": self.clip,
            "eps": self.eps,
            "enabled": self.enabled,
        }

    @staticmethod
    def from_state_dict(d: dict[str, Any]) -> ObsNormalizer:
        n = ObsNormalizer(len(d["mean"]), clip=d["clip"], eps=d["eps"], enabled=d["enabled"])
        n.mean = np.asarray(d["mean"], dtype=np.float64)
        n.var = np.asarray(d["var"], dtype=np.float64)
        n.count = float(d["count"])
        return n
