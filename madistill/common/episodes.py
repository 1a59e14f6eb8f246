"""Statistics of finished episodes."""

from __future__ import annotations

import numpy as np

from madistill.envs.episodes import EpisodeRecord


def team_returns(episodes: list[EpisodeRecord]) -> float:
    """Mean team return of ``episodes`` (NaN when none finished)."""
    return float(np.mean([e.team_return for e in episodes])) if episodes else float("nan")
