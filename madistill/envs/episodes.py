"""The record of one finished episode, produced by the vector env and consumed by every report."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class EpisodeRecord:
    """One finished episode of one env copy."""

    seed: int  # the reset seed of the episode
    length: int  # env steps
    agent_returns: dict[str, float]  # undiscounted return per agent id

    @cached_property
    def team_return(self) -> float:
        """Mean over agents of each agent's episode return (computed once: every report reads it, and a record
        does not change once its episode has ended)."""
        return float(np.mean(list(self.agent_returns.values())))
