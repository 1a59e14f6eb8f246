"""The record of one finished episode, produced by the vector env and consumed by every report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpisodeRecord:
    """One finished episode of one env copy."""

    seed: int  # the reset seed of the episode
    length: int  # env steps
    agent_returns: dict[str, float]  # undiscounted return per agent id

    @property
    def team_return(self) -> float:
        """Mean over agents of each agent's episode return."""
        return float(np.mean(list(self.agent_returns.values())))
