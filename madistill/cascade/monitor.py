"""The cascade study of one team: impulse faults on every agent give the influence matrix, the studied fault
(on its victims, or on each agent in turn) gives deviations and cascades, all from one paired run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from madistill.cascade.faults import FAULTS, ActionFault, Fault, FaultEnv, Holding, make_fault
from madistill.cascade.measures import Cascade, Influence, cascade, deviation_summary, influence
from madistill.cascade.paired import MakeVenv, PairedRun, check_reproducible, noise_floor, paired_rollouts
from madistill.config import FaultConfig
from madistill.errors import MadistillError
from madistill.policies.base import TeamPolicy


@dataclass
class StudiedFault:
    """One fault of the study: its label in the reports, its victims and the fault itself."""

    label: str
    victims: list[str]
    fault: Fault


@dataclass
class CascadeStudy:
    """Everything one team's cascade study measured (``to_dict`` is ``reports/cascade.json``'s body)."""

    agents: list[str]
    influence: Influence
    faults: list[StudiedFault]
    cascades: list[Cascade]
    run: PairedRun  # the paired run; the studied faults are its last len(faults) fault blocks
    threshold: float  # the failure threshold in use: the largest of cascade.threshold, replay_deviation, noise_floor
    replay_deviation: float  # the largest TV between clean twins of the replay check (0 when reproducible)
    noise_floor: float  # the quantile of the TV between independently sampling clean twins (0: greedy or off)
    teams: dict[str, tuple[str, ...]] | None = None  # the env's teams, whose agents' return deltas are also kept apart

    def block(self, i: int) -> int:
        """The paired run's fault index of studied fault i."""
        return self.run.tv.shape[0] - len(self.faults) + i

    def to_dict(self, n_boot: int, confidence: float) -> dict[str, Any]:
        inf = self.influence
        return {
            "agents": self.agents,
            "seeds": self.run.seeds.tolist(),  # the episodes, in the order of every per-episode list
            "first_lag": inf.first_lag(),
            "influence": inf.matrix(inf.effect),
            "influence_ci": {"lo": inf.matrix(inf.lo), "hi": inf.matrix(inf.hi)},
            "edges": inf.edges(),
            "reachable": inf.reachable(),
            "threshold": self.threshold,
            "replay_deviation": self.replay_deviation,
            "noise_floor": self.noise_floor,
            "faults": {
                sf.label: {
                    "deviation": deviation_summary(self.run, self.block(i), sf.victims),
                    "cascade": self.cascades[i].summary(n_boot, confidence, self.teams),
                }
                for i, sf in enumerate(self.faults)
            },
        }


def fault_config(base: Any = None, **changes: Any) -> Any:
    """A FaultConfig node: the schema's defaults, then ``base`` (a config node or dict), then ``changes``."""
    return OmegaConf.merge(OmegaConf.structured(FaultConfig), base or {}, changes)


def studied_faults(fc: Any, env: FaultEnv, agents: Sequence[str]) -> list[StudiedFault]:
    """The studied fault on its victims, or on each agent in turn when ``fault.victims`` is empty."""
    sets = [list(fc.victims)] if fc.victims else [[a] for a in agents]
    return [StudiedFault(f"{fc.name}@{'+'.join(v)}", v, make_fault(fc, env, v)) for v in sets]


def impulse_faults(impulse: Any, onsets: Sequence[int], env: FaultEnv, agents: Sequence[str]) -> tuple[list[Fault], list[str]]:
    """One-step impulses of the action fault ``impulse`` (a FaultConfig node) on each agent at each of ``onsets``,
    and the source agent of each."""
    faults, sources = [], []
    for a in agents:
        for onset in onsets:
            f = make_fault(fault_config(impulse, victims=[a], onset=int(onset), onset_max=None, duration=1, rate=1.0), env)
            if not isinstance(f, ActionFault) or isinstance(f, Holding):  # a one-step stuck action is the chosen one
                usable = [n for n, c in FAULTS.items() if issubclass(c, ActionFault) and not issubclass(c, Holding)]
                raise MadistillError(f"cascade.impulse={impulse.name!r} changes no action in a one-step impulse; "
                                     f"influence is measured from action impulses: use one of {', '.join(usable)}")
            faults.append(f)
            sources.append(a)
    return faults, sources


def check_onsets(faults: Sequence[StudiedFault], cc: Any, lengths: np.ndarray, env_id: str) -> None:
    """Refuse onsets at or past the end of the (replayed) episodes: such a fault would never act."""
    shortest = int(lengths.min())
    late = max(sf.fault.scope.last_onset for sf in faults)
    past = ([f"fault.onset (latest {late})"] if late >= shortest else []) + (
        [f"cascade.onsets={list(cc.onsets)}"] if max(cc.onsets) >= shortest else [])
    if past:  # both at once, so that one fix of the command line does
        raise MadistillError(f"onsets past the episode's end, {' and '.join(past)}: episodes of {env_id!r} last "
                             f"{shortest} steps, so choose onsets below {shortest}")


def study(make_venv: MakeVenv, team: TeamPolicy, env: FaultEnv, cc: Any, fc: Any, impulse: Any, env_id: str,
          progress: str | None = None) -> CascadeStudy:
    """The cascade study of ``team`` (cascade config ``cc``, studied fault ``fc``, influence impulses of the
    FaultConfig ``impulse``): every check first (faults, victims, reproducibility, onsets), then one paired run
    with every impulse and studied fault side by side (``progress``: its progress bar's label, None: none)."""
    agents = [a for g in env.groups for a in g.agents]
    faults = studied_faults(fc, env, agents)
    impulses, sources = impulse_faults(impulse, list(cc.onsets), env, agents)
    replay = check_reproducible(make_venv, team, int(cc.replay_episodes), int(cc.seed), env_id, bool(cc.deterministic))
    check_onsets(faults, cc, replay.lengths[0], env_id)
    # with sampled actions, one more clean twin sampling from streams of its own gives the noise floor
    floor_block = [None] if not cc.deterministic and cc.noise_quantile is not None else []
    run = paired_rollouts(make_venv, team, [*impulses, *floor_block, *(sf.fault for sf in faults)], int(cc.episodes),
                          int(cc.seed), bool(cc.deterministic), independent=True, max_copies=int(cc.max_copies), progress=progress)
    inf = influence(run, sources, int(cc.lags), int(cc.n_boot), float(cc.confidence), float(cc.min_effect), int(cc.seed))
    replay_dev = float(np.nanmax(replay.tv, initial=0.0))
    floor = noise_floor(run, len(impulses), float(cc.noise_quantile)) if floor_block else 0.0  # greedy twins act alike
    threshold = max(float(cc.threshold), replay_dev, floor)
    edges = inf.edges()
    loss = None if cc.return_loss is None else float(cc.return_loss)
    first = len(impulses) + len(floor_block)  # the studied faults' first block
    cascades = [cascade(run, first + i, sf.victims, threshold, edges, loss) for i, sf in enumerate(faults)]
    teams = {t: tuple(a) for t, a in env.teams.items()} if env.teams else None
    return CascadeStudy(list(run.agents), inf, faults, cascades, run, threshold, replay_dev, floor, teams)
