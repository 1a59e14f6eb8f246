"""Checkpoint selection on held-out episodes: of the policies a training run passes through, keep the one
with the best validation score, a mix of its clean and its attacked team return.

Robust training overfits and RL fine-tuning drifts: Rice et al. (2020) find that stopping adversarial
training where a held-out adversarial metric peaks recovers most of what later epochs lose, and PPO from a
distilled student can lose clean return on one seed while gaining on another (docs/results_log.md, "Robust RL
fine-tuning of the spread students"). Every candidate plays the same validation episodes (seeds away from
training and evaluation), so candidates are compared on paired episodes and the choice never sees the
evaluation's.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from madistill.attacks.budget import Budget
from madistill.attacks.robustness import suite_attack
from madistill.attacks.transform import AttackTransform
from madistill.common.episodes import team_returns
from madistill.common.io import atomic_write_text
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.evaluate.evaluator import run_episodes
from madistill.policies.base import TeamPolicy
from madistill.tb import TBLogger


@dataclass
class Validation:
    """One candidate's validation: mean team return clean, the lowest over the attacks, and the score."""

    step: int
    clean: float
    worst: float
    score: float


class BestPolicy:
    """Validates candidates and keeps a copy of the best-scoring one.

    ``score = (1 - robust_weight) * clean + robust_weight * worst``, where ``worst`` is the lowest mean team
    return over ``attacks`` (config.ValidationAttack names, settings from the ``attack`` config) with every agent a
    victim at radius ``eps``; ties keep the earlier candidate.
    """

    def __init__(self, venv: MultiAgentVecEnv, unit_budgets: Mapping[str, Budget], ac: Any, attacks: list[str],
                 eps: float, episodes: int, robust_weight: float, seed: int, tb: TBLogger | None = None):
        agents = [a for g in venv.groups for a in g.agents]
        budgets = {name: b.scaled(float(eps)) for name, b in unit_budgets.items()}
        self.attacks = {a: AttackTransform(suite_attack(a, ac), agents, budgets) for a in attacks if eps > 0}
        self.venv, self.episodes, self.weight, self.seed, self.tb = venv, int(episodes), float(robust_weight), int(seed), tb
        self.history: list[Validation] = []
        self.best: Validation | None = None
        self.team: TeamPolicy | None = None

    def _mean_return(self, team: TeamPolicy, attack: AttackTransform | None) -> float:
        return team_returns(run_episodes(self.venv, team, self.episodes, self.seed, transforms=[attack] if attack else []))

    def offer(self, step: int, team: TeamPolicy) -> Validation:
        """Validate ``team`` (a candidate at training step ``step``); keep a copy if it beats the best so far."""
        clean = self._mean_return(team, None)
        worst = min([self._mean_return(team, a) for a in self.attacks.values()], default=clean)
        v = Validation(int(step), clean, worst, (1.0 - self.weight) * clean + self.weight * worst)
        self.history.append(v)
        if self.best is None or v.score > self.best.score:
            self.best, self.team = v, copy.deepcopy(team)
        if self.tb is not None:
            for key in ("clean", "worst", "score"):
                self.tb.scalar(f"select/{key}", getattr(v, key), v.step)
            self.tb.scalar("select/best_step", self.best.step, v.step)
            self.tb.flush()
        return v

    def save(self, path: Path) -> Path:
        """The validations and the choice as JSON (``reports/selection.json`` of a run)."""
        if self.best is None:
            raise MadistillError("no candidate was validated")
        return atomic_write_text(path, json.dumps({
            "chosen": asdict(self.best), "history": [asdict(v) for v in self.history],
            "episodes": self.episodes, "seed": self.seed, "robust_weight": self.weight, "attacks": list(self.attacks),
        }, indent=2))
