"""Per-group observation normaliser: attack budgets and saliency baselines live in its units."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from madistill.envs.groups import AgentGroup


class ObsNormalizer:
    """Running mean/variance of one group's observations (parallel Welford), frozen after training.

    ``normalize(x) = clip((x - mean) / sqrt(var + eps), -clip, clip)``. Features that never vary keep
    ``var = 0`` and map to 0, so a constant one-hot id cannot blow up. A ``fixed`` normaliser keeps the
    statistics it was given (``update`` ignores data): image groups scale every pixel by the same 255.
    """

    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8, enabled: bool = True, fixed: bool = False):
        self.mean = np.zeros(dim, dtype=np.float64)
        self.var = np.ones(dim, dtype=np.float64)
        self.count = 0.0
        self.clip = float(clip)
        self.eps = float(eps)
        self.enabled = enabled
        self.fixed = fixed
        self._cache: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def for_group(group: AgentGroup, enabled: bool = True) -> ObsNormalizer:
        """A fresh normaliser for ``group``: running statistics (``enabled``: ``teacher.normalize_obs``), or for
        image observations the fixed map of pixel values 0..255 to [0, 1] that CNNs expect (SB3's
        ``preprocess_obs``), whatever ``enabled`` says: per-pixel statistics would make a constant background
        pixel 0 and amplify its noise, and an attack budget would mean a different intensity on every pixel."""
        if group.image_shape is None:
            return ObsNormalizer(group.obs_dim, enabled=enabled)
        n = ObsNormalizer(group.obs_dim, fixed=True)
        n.var = np.full(group.obs_dim, 255.0**2 - n.eps)  # so that std = sqrt(var + eps) = 255
        return n

    @property
    def std(self) -> np.ndarray:
        """Per-feature scale of one normalised unit (1 when disabled)."""
        return np.sqrt(self.var + self.eps) if self.enabled else np.ones_like(self.mean)

    def update(self, x: np.ndarray) -> None:
        """Fold a batch ``[B, dim]`` into the statistics (Chan et al. parallel variance)."""
        if not self.enabled or self.fixed or len(x) == 0:
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
            "fixed": self.fixed,
        }

    @staticmethod
    def from_state_dict(d: dict[str, Any]) -> ObsNormalizer:
        n = ObsNormalizer(len(d["mean"]), clip=d["clip"], eps=d["eps"], enabled=d["enabled"], fixed=d.get("fixed", False))
        n.mean = np.asarray(d["mean"], dtype=np.float64)
        n.var = np.asarray(d["var"], dtype=np.float64)
        n.count = float(d["count"])
        return n
