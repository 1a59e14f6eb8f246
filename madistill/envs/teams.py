"""Teams (sides): which agents play for the same return.

In a cooperative env every agent is on one team and the team return is the mean over all agents. In a
competitive or mixed env (adversaries against good agents) that mean averages opposing sides, so every
report gives each team's return instead: the mean over that team's agents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from madistill.envs.episodes import EpisodeRecord
from madistill.errors import MadistillError

Teams = dict[str, tuple[str, ...]]

# The name of the one team of a cooperative env.
SINGLE = "team"
# PettingZoo's MPE names adversaries ``adversary_<i>`` (and ``leadadversary_0`` in simple_world_comm) and the
# other side ``agent_<i>``: simple_adversary, simple_tag, simple_world_comm and simple_push.
ADVERSARY_MARK = "adversary"
ADVERSARIES, GOOD = "adversaries", "good"


def infer_teams(agents: Sequence[str]) -> Teams:
    """Teams from PettingZoo's naming: agents whose name contains ``adversary`` against the rest (MPE's
    adversary envs); one team of every agent when the names show no sides."""
    adversaries = tuple(a for a in agents if ADVERSARY_MARK in a)
    good = tuple(a for a in agents if ADVERSARY_MARK not in a)
    if adversaries and good:
        return {ADVERSARIES: adversaries, GOOD: good}
    return {SINGLE: tuple(agents)}


def resolve_teams(spec: Mapping[str, Sequence[str]] | None, agents: Sequence[str]) -> Teams:
    """The env's teams: ``spec`` (``env.teams``: team name -> agent ids or agent-name prefixes), else
    :func:`infer_teams`. Every agent must land in exactly one team and every entry must match an agent."""
    if not spec:
        return infer_teams(agents)
    owner: dict[str, str] = {}
    for team, entries in spec.items():
        if isinstance(entries, str):  # env.teams.good=agent_ means the one prefix, not its characters
            entries = [entries]
        for entry in entries:
            matched = [a for a in agents if a == entry or a.startswith(str(entry))]
            if not matched:
                raise MadistillError(f"env.teams.{team} names {entry!r}, which is no agent id or prefix of this "
                                     f"env's agents: {list(agents)}")
            for a in matched:
                if owner.setdefault(a, team) != team:
                    raise MadistillError(f"agent {a!r} is in env.teams.{owner[a]} and env.teams.{team}: put every "
                                         f"agent in exactly one team (agents: {list(agents)})")
    missing = [a for a in agents if a not in owner]
    if missing:
        raise MadistillError(f"agents {missing} are in no team of env.teams: add them to one (agents: {list(agents)})")
    return {team: tuple(a for a in agents if owner[a] == team) for team in spec}


def several_teams(teams: Mapping[str, Sequence[str]] | None) -> bool:
    """Whether there are opposing sides, so reports give each team's return instead of the all-agent mean."""
    return teams is not None and len(teams) > 1


def victims_team(teams: Mapping[str, Sequence[str]], victims: Sequence[str]) -> str | None:
    """The one team all ``victims`` play for; None where they play for several."""
    sides = [team for team, agents in teams.items() if set(agents) & set(victims)]
    return sides[0] if len(sides) == 1 else None


def teams_line(teams: Mapping[str, Sequence[str]]) -> str:
    """One line for reports saying who plays on which team."""
    members = "; ".join(f"**{team}**: {', '.join(agents)}" for team, agents in teams.items())
    return f"Teams (each team's return is the mean over its agents): {members}."


def team_return(record: EpisodeRecord, agents: Sequence[str]) -> float:
    """Mean episode return of ``agents`` (those present in the episode); NaN when none of them is."""
    values = [record.agent_returns[a] for a in agents if a in record.agent_returns]
    return float(np.mean(values)) if values else float("nan")


def team_means(records: Sequence[EpisodeRecord], teams: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Each team's mean return over ``records`` (episodes where the team has no agent are left out)."""
    return {team: float(np.nanmean(team_arrays(records, agents))) for team, agents in teams.items()}


def team_arrays(records: Sequence[EpisodeRecord], agents: Sequence[str]) -> np.ndarray:
    """Per-episode returns of the team of ``agents`` (NaN where none of them took part)."""
    return np.array([team_return(r, agents) for r in records], dtype=np.float64)
