"""Robustness evaluation of saved policies: team and per-agent return under every attack, budget and victim
set, the worst case over attacks, and the gradient-masking checks; report, curves and TensorBoard."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from madistill.attacks.budget import Budget, group_budgets
from madistill.attacks.checks import (
    DEGENERATE,
    LEARNED,
    OBJECTIVE_MISSES,
    TARGETED_PREFIX,
    UNDER_TRAINED,
    Flag,
    probe,
    return_checks,
    training_checks,
)
from madistill.attacks.learned import DirectorAttack, LearnedAdversary, TrainingCurve, train_adversary
from madistill.attacks.lookahead import LookaheadAttack
from madistill.attacks.methods import Attack, variants
from madistill.attacks.transform import AttackTransform, ConstantOffset, victim_sets
from madistill.branching import Branching, NotBranchable
from madistill.common.collect import collect_round
from madistill.common.episodes import team_returns
from madistill.config import AttackMethod
from madistill.envs.episodes import EpisodeRecord
from madistill.envs.features import FeatureLayout
from madistill.envs.teams import several_teams, team_arrays, team_means, team_return, teams_line, victims_team
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.evaluate.evaluator import run_episodes
from madistill.evaluate.stats import bootstrap_ci
from madistill.policies.base import TeamPolicy
from madistill.tb import pyplot
from madistill.transforms import ActionTransform, ObsTransform

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The attack suite by name: "critic" is PGD on minus a critic's value, "transfer" is PGD crafted on a
# surrogate policy; "learned" trains a PPO adversary per victim set and eps (attack.learned_steps);
# "offsets" keeps, per episode, the worst of attack.offset_candidates constant corner offsets (ConstantOffset);
# "pgd_strong" (2x steps, 2x restarts) runs for the masking checks; "targeted_random" and "targeted_lowest" are
# PGD towards a chosen action (methods.targets), "targeted_lookahead" towards the joint action a branch of the
# episode shows most harmful (attacks.lookahead; skipped with a note where the env cannot branch). "director"
# (opt-in) trains a PPO director per victim set and eps (attack.director_steps) whose target actions the
# targeted PGD forces (attacks.learned.DirectorAttack).
SUITE = tuple(AttackMethod)

# What each attacker knows and can do, per step and per victim, inside the same l_inf budget: the report and
# the JSON name it for every attack they show.
THREAT_MODELS = {
    "random": "no knowledge: a uniform draw from the budget",
    "fgsm": "white-box victim policy: one gradient step away from its clean greedy action",
    "pgd": "white-box victim policy: PGD away from its clean action distribution (KL)",
    "pgd_strong": "white-box victim policy: PGD on KL with 2x steps and restarts (masking checks)",
    "critic": "white-box victim critic V(s) on the victim's observation: PGD lowering the value it reads",
    "spsa": "black-box victim policy (its outputs only): PGD on KL with estimated gradients",
    "transfer": "white-box surrogate policy, no access to the victim: PGD on KL crafted on the surrogate",
    "offsets": "a simulator replaying whole episodes: the worst of constant corner offsets, no gradients",
    "learned": "a simulator to train in: a PPO adversary trained to lower the return, seeing the victims' observations",
    "targeted_random": "white-box victim policy: PGD forcing a uniformly random target action (the targeted floor)",
    "targeted_lowest": "white-box victim policy: PGD forcing the action its clean policy ranks lowest (the lowest-ranked "
                       "one the budget reaches, of attack.target_candidates; Box: the far corner of the action box); "
                       "the victim's observation only, no env branching",
    "targeted_lookahead": "an attacker with a simulator of the env, white-box victim policy: per step, PGD forcing the "
                          "victims' joint action that, played now and followed by attack.lookahead_horizon steps of the "
                          "team's own policy, gives the lowest team return (branches replayed from the episode seed and the "
                          "actions so far; plus the critic attack's critic's discounted value at the horizon with "
                          "attack.lookahead_critic)",
    "director": "a simulator to train in, white-box victim policy: a PPO director (PA-AD) seeing the victims' clean "
                "observations picks a target action per victim (Box: a target mean), trained to lower the return; "
                "PGD forces it",
}


def suite_attack(name: str, ac: Any) -> Attack:
    """The Attack behind a suite name, from the ``attack`` config."""
    if name in ("learned", "director", "offsets", "targeted_lookahead"):
        raise MadistillError(f"{name!r} is not a per-step attack on observations alone: evaluate_robustness runs it")
    suite = variants(Attack("pgd", "kl", ac.steps, ac.restarts, ac.step_size, ac.spsa_samples, ac.spsa_delta,
                            candidates=ac.target_candidates))
    if name not in suite:
        raise MadistillError(f"{name!r} is no per-step attack of the suite: a new one goes into variants() "
                             "(madistill/attacks/methods.py), a whole-episode one into a branch of evaluate_robustness")
    return suite[name]


CHECKS_NOT_RUN = "not run (attack.checks=false): gradient attacks alone can be masked; attack=suite runs the checks"

Cells = dict[str, dict[str, dict[float, np.ndarray]]]  # per-episode returns [victims][attack][eps]


@dataclass
class RobustnessResult:
    """One policy's per-episode team returns ``episodes[victims][attack][eps]`` (every cell on the same
    episode seeds), mean per-agent returns, the masking flags, and the attacks the checks found degenerate
    (they changed nothing, so no flag rests on them); means and CIs derive from the episodes.

    With several teams (``teams``: team -> agents; empty with one team) each team's clean and random return
    and per-episode returns ``team_episodes[team][victims][attack][eps]`` too, and every method taking a
    ``team`` reads that team's returns instead of the mean over all agents (``team=None``)."""

    clean: float
    random: float
    clean_agents: dict[str, float]
    seed: int = 0  # bootstrap seed of the CIs
    n_boot: int = 1000  # bootstrap resamples of the CIs
    episodes: dict[str, dict[str, dict[float, np.ndarray]]] = field(default_factory=dict)
    agent_returns: dict[str, dict[str, dict[float, dict[str, float]]]] = field(default_factory=dict)
    flags: dict[str, list[Flag]] = field(default_factory=dict)
    degenerate: dict[str, list[Flag]] = field(default_factory=dict)
    probes: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of one evaluation: clean, and per attack
    checked: bool = True  # whether the gradient-masking checks ran (attack.checks): no flags means nothing otherwise
    budgets: tuple[float, ...] = ()  # attack.eps: the budgets the suite ran at (the collapse check adds one of its own)
    teams: dict[str, tuple[str, ...]] = field(default_factory=dict)
    team_clean: dict[str, float] = field(default_factory=dict)
    team_random: dict[str, float] = field(default_factory=dict)
    team_episodes: dict[str, Cells] = field(default_factory=dict)
    team_clean_episodes: dict[str, np.ndarray] = field(default_factory=dict)  # per-episode clean returns per team
    victim_members: dict[str, tuple[str, ...]] = field(default_factory=dict)  # victim set -> its agents
    objective: dict[str, list[Flag]] = field(default_factory=dict)  # objective_misses_return flags per victim set
    clean_episodes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-episode clean team returns
    under_trained: dict[str, list[Flag]] = field(default_factory=dict)  # under_trained flags per victim set
    # learned attacks' training curves [victims][attack][eps]: (env steps, mean episode return to the attacker)
    training: dict[str, dict[str, dict[float, list[tuple[int, float]]]]] = field(default_factory=dict)

    @property
    def returns(self) -> dict[str, dict[str, dict[float, float]]]:
        """Mean team return per victim set, attack and eps."""
        return self.returns_of(None)

    def returns_of(self, team: str | None) -> dict[str, dict[str, dict[float, float]]]:
        """Mean return of ``team`` (None: of every agent) per victim set, attack and eps."""
        return {v: {a: {e: float(np.nanmean(x)) for e, x in r.items()} for a, r in t.items()}
                for v, t in self.cells_of(team).items()}

    def cells_of(self, team: str | None) -> Cells:
        """Per-episode returns of ``team`` (None: of every agent) per victim set, attack and eps."""
        return self.episodes if team is None else self.team_episodes[team]

    def worst_from(self, victims: str, eps: float, team: str | None = None) -> tuple[str, str, float]:
        """The victim set, attack and return of the lowest return of ``team`` (None: team return of every
        agent) at ``eps`` over the attacks on ``victims`` and on every evaluated subset of them: an attacker
        of a set may leave any of its members alone, so a set is never less harmful than its subsets."""
        members = set(self.victim_members.get(victims, ()))
        sets = [victims, *(v for v, m in self.victim_members.items() if v != victims and members and set(m) <= members)]
        cells = self.cells_of(team)
        # only the cells at eps of these sets: a report asks for every set and eps in turn
        rows = {(v, a): float(np.nanmean(r[eps])) for v in sets for a, r in cells[v].items() if eps in r}
        where = min(rows, key=rows.get)  # type: ignore[arg-type]
        return *where, rows[where]

    def suite_eps(self, victims: str, team: str | None = None) -> list[float]:
        """The budgets the suite ran on ``victims`` at, which have a worst case: not the collapse check's larger
        one, where PGD alone runs (a result without ``budgets`` recorded: every budget it holds)."""
        held = {e for r in self.cells_of(team).get(victims, {}).values() for e in r}
        return sorted(held & set(self.budgets) if self.budgets else held)

    def worst(self, victims: str, eps: float, team: str | None = None) -> tuple[str, float]:
        """The worst case of :meth:`worst_from`: the attack (``<attack> on <subset>`` when it came from a
        subset of ``victims``) and its return."""
        subset, name, value = self.worst_from(victims, eps, team)
        return _worst_name(victims, subset, name), value

    def worst_agents(self, victims: str, eps: float, team: str | None = None) -> tuple[str, dict[str, float]]:
        """The worst case of ``team`` (None: of every agent) at ``eps`` as :meth:`worst` names it, and the
        mean per-agent returns under it."""
        subset, name, _ = self.worst_from(victims, eps, team)
        return _worst_name(victims, subset, name), self.agent_returns[subset][name][eps]

    def add_checks(self, key: str, flags: list[Flag]) -> None:
        """Record the checks' findings under ``key`` (a victim set, or ``probe:<group>``): masking flags apart
        from degenerate-attack reports, objective_misses_return (evidence about the suite) and under_trained
        (about a learned attack), so a count of flags counts only evidence about the policy."""
        self.flags.setdefault(key, []).extend(f for f in flags if f.name not in (DEGENERATE, OBJECTIVE_MISSES, UNDER_TRAINED))
        self.degenerate.setdefault(key, []).extend(f for f in flags if f.name == DEGENERATE)
        self.objective.setdefault(key, []).extend(f for f in flags if f.name == OBJECTIVE_MISSES)
        self.under_trained.setdefault(key, []).extend(f for f in flags if f.name == UNDER_TRAINED)

    def team_of(self, agent: str) -> str | None:
        """The team ``agent`` plays for (None with one team)."""
        return next((team for team, agents in self.teams.items() if agent in agents), None)

    def to_dict(self) -> dict[str, Any]:
        cells = self._cells_dict(None)
        out = {
            "clean": self.clean, "random": self.random, "clean_agents": self.clean_agents,
            "returns": cells["returns"], "ci": cells["ci"],
            "agent_returns": {v: {a: _eps_key(r) for a, r in t.items()} for v, t in self.agent_returns.items()},
            "worst_case": cells["worst_case"], "worst_case_from": cells["worst_case_from"],
            "flags": {v: [f.__dict__ for f in fl] for v, fl in self.flags.items()},
            "degenerate_attacks": {v: [f.__dict__ for f in fl] for v, fl in self.degenerate.items()},
            "objective_checks": {v: [f.__dict__ for f in fl] for v, fl in self.objective.items()},
            "training_checks": {v: [f.__dict__ for f in fl] for v, fl in self.under_trained.items()},
            "training_curves": {v: {a: _eps_key(r) for a, r in t.items()} for v, t in self.training.items()},
            "threat_models": {a: THREAT_MODELS[a] for a in self.attacks()},
            "victim_sets": {v: list(m) for v, m in self.victim_members.items()},
            "probes": self.probes, "skipped": self.skipped, "seconds_per_evaluation": self.seconds,
            "checks_run": self.checked,
        }
        if self.teams:
            out["teams"] = {team: {"agents": list(agents), "clean": self.team_clean[team],
                                   "random": self.team_random[team], **self._cells_dict(team)}
                            for team, agents in self.teams.items()}
        return out

    def _cells_dict(self, team: str | None) -> dict[str, Any]:
        """JSON of ``team``'s returns (None: of every agent): means, bootstrap CIs and the worst case per
        victim set and eps."""
        cells = self.cells_of(team)
        returns = self.returns_of(team)
        ci = {v: {a: {e: bootstrap_ci(x[~np.isnan(x)], np.mean, n_boot=self.n_boot, seed=self.seed)
                      for e, x in r.items()} for a, r in t.items()} for v, t in cells.items()}
        worst = {v: {str(e): self.worst_from(v, e, team) for e in sorted({e for r in t.values() for e in r})}
                 for v, t in returns.items()}
        return {
            "returns": {v: {a: _eps_key(r) for a, r in t.items()} for v, t in returns.items()},
            "ci": {v: {a: _eps_key(r) for a, r in t.items()} for v, t in ci.items()},
            "worst_case": {v: {e: (_worst_name(v, s, a), r) for e, (s, a, r) in w.items()} for v, w in worst.items()},
            # the victim set each worst case came from: the set itself or one of its evaluated subsets
            "worst_case_from": {v: {e: s for e, (s, _, _) in w.items()} for v, w in worst.items()},
        }

    def attacks(self) -> list[str]:
        """Every attack evaluated on some victim set, in the order first evaluated."""
        return list(dict.fromkeys(a for t in self.episodes.values() for a in t))


def _worst_name(victims: str, subset: str, attack: str) -> str:
    """A worst case's name: the attack, with ``on <subset>`` when it came from a subset of ``victims``."""
    return attack if subset == victims else f"{attack} on {subset}"


def _eps_key(by_eps: Mapping[float, Any]) -> dict[str, Any]:
    """``by_eps`` with string keys, as JSON needs."""
    return {str(e): v for e, v in by_eps.items()}


def _agents(records: list[EpisodeRecord]) -> dict[str, float]:
    return {a: float(np.mean([e.agent_returns[a] for e in records])) for a in records[0].agent_returns}


def evaluations(ac: Any, n_sets: int) -> int:
    """The evaluations :func:`evaluate_robustness` plays for one policy on ``n_sets`` victim sets under the
    ``attack`` config ``ac``, each one step of its ``progress`` bar: every attack at every eps, and with the
    masking checks the stronger PGD and the collapse budget's."""
    extra = (1 + bool(ac.collapse_eps)) if ac.checks else 0
    return n_sets * (len(ac.methods) * len(ac.eps) + extra)


def evaluate_robustness(
    venv: MultiAgentVecEnv,
    team: TeamPolicy,
    layouts: Mapping[str, FeatureLayout],
    ac: Any,
    random_return: float,
    seed: int,
    surrogate: TeamPolicy | None = None,
    critic: TeamPolicy | None = None,
    progress: Any = None,
    teams: Mapping[str, Sequence[str]] | None = None,
    random_teams: Mapping[str, float] | None = None,
    faults: Sequence[ObsTransform | ActionTransform] = (),
    attacked: TeamPolicy | None = None,
) -> RobustnessResult:
    """Every configured attack x eps x victim set on ``team`` (episodes with seeds ``seed...``), plus the
    strong-PGD and collapse-budget runs the masking checks need, and the objective-level probe.
    ``faults`` (the configured fault) act in the clean and every attacked evaluation, before the attack: the
    robustness of a team with a failing agent (the probe runs without them).

    ``teams`` (team -> agents) name the victim sets ``team:<name>``; with several teams, each team's returns
    are kept too, next to its random-policy return from ``random_teams``.

    ``attacked``: the team the per-step white-box attacks (all but ``transfer``, ``learned``, ``offsets`` and
    ``targeted_lookahead``) craft on instead of ``team``: a purified team's BPDA, EOT or undefended view
    (``policies.purified.attack_view``); the probe attacks ``team`` itself."""
    start = time.perf_counter()
    clean_recs = run_episodes(venv, team, ac.episodes, seed, transforms=faults)
    clean = team_returns(clean_recs)
    res = RobustnessResult(clean, random_return, _agents(clean_recs), seed, ac.n_boot, checked=bool(ac.checks),
                           clean_episodes=np.array([r.team_return for r in clean_recs]),
                           budgets=tuple(sorted(float(e) for e in ac.eps)))
    if several_teams(teams):
        if random_teams is None:
            raise ValueError("several teams need each team's random-policy return (random_teams)")
        res.teams = {t: tuple(agents) for t, agents in teams.items()}  # type: ignore[union-attr]
        res.team_clean, res.team_random = team_means(clean_recs, res.teams), dict(random_teams)
        res.team_clean_episodes = {t: team_arrays(clean_recs, agents) for t, agents in res.teams.items()}
    res.seconds["clean"] = time.perf_counter() - start
    runs_of: dict[str, int] = {}
    budgets = {float(e): group_budgets(float(e), layouts, ac.exclude, team.device, ac.scale) for e in ac.eps}
    mid = sorted(budgets)[len(budgets) // 2]
    methods = _runnable(ac, surrogate, critic, res)
    extra = [("pgd_strong", mid)] if ac.checks else []
    if ac.checks and ac.collapse_eps:
        budgets[float(ac.collapse_eps)] = group_budgets(float(ac.collapse_eps), layouts, ac.exclude, team.device, ac.scale)
        extra.append(("pgd", float(ac.collapse_eps)))
    runs = [(m, e) for m in methods for e in sorted(float(x) for x in ac.eps)] + extra
    agents = [a for g in team.groups for a in g.agents]
    sets = victim_sets(list(ac.victims), agents, teams)
    res.victim_members = {v: tuple(members) for v, members in sets.items()}
    for vname, victims in sets.items():
        # the team whose return the search, learned and lookahead attacks lower: the victims' one team, else
        # (victims on several teams) every agent
        attacked_side = victims_team(res.teams, victims)
        target = None if attacked_side is None else res.teams[attacked_side]
        unbranchable: set[str] = set()  # the lookahead, once it found these victims or the env unbranchable
        res.agent_returns[vname], res.episodes[vname] = {}, {}
        for side in res.teams:
            res.team_episodes.setdefault(side, {})[vname] = {}
        for method, eps in runs:
            start = time.perf_counter()
            recs = None if method in unbranchable else _attacked(method, vname, victims, budgets[eps], venv, team, ac,
                                                                 seed, surrogate, critic, target, faults, res, attacked, eps)
            if recs is None:
                unbranchable.add(method)
            else:
                # running mean over every evaluation of this attack (all eps, victim sets and check runs)
                runs_of[method] = runs_of.get(method, 0) + 1
                elapsed = time.perf_counter() - start
                res.seconds[method] = res.seconds.get(method, 0.0) + (elapsed - res.seconds.get(method, 0.0)) / runs_of[method]
                res.agent_returns[vname].setdefault(method, {})[eps] = _agents(recs)
                res.episodes[vname].setdefault(method, {})[eps] = np.array([r.team_return for r in recs])
                for side, members in res.teams.items():
                    res.team_episodes[side][vname].setdefault(method, {})[eps] = team_arrays(recs, members)
            if progress is not None:
                progress.update(1)
        if not set(methods) & set(res.episodes[vname]):
            _none_ran(ac, res, f" on victims {vname}")
        if ac.checks:
            res.add_checks(vname, _return_flags(res, vname, victims, ac, clean_recs))
        # learned attacks are checked even without the masking checks: it needs no extra runs, and an
        # under-trained one must never pass for a result
        res.add_checks(vname, training_checks(res.episodes[vname] if attacked_side is None
                                              else res.team_episodes[attacked_side][vname],
                                              res.seed, ac.n_boot))
    if ac.checks:
        _probe(venv, team, budgets[mid], ac, seed, surrogate, res)
    return res


def _runnable(ac: Any, surrogate: TeamPolicy | None, critic: TeamPolicy | None, res: RobustnessResult) -> list[str]:
    """``attack.methods`` but those that need a policy there is none of (noted in ``res.skipped``); refused where
    none is left."""
    methods = list(ac.methods)
    if "transfer" in methods and surrogate is None:
        methods.remove("transfer")
        res.skipped.append("transfer: no surrogate policy (set attack.transfer_from=<policy>)")
    if "critic" in methods and critic is None:
        methods.remove("critic")
        res.skipped.append("critic: no policy with a value head on one agent's observation (set attack.critic=<run of a "
                           "teacher trained with teacher.critic=local>)")
    if not methods:
        _none_ran(ac, res, "")
    return methods


class NoAttackRuns(MadistillError):
    """No attack of ``attack.methods`` can run on a policy (each needs what it lacks: a surrogate, a critic, a
    branchable env)."""


def _none_ran(ac: Any, res: RobustnessResult, where: str) -> None:
    """Refuse a policy on which no attack of ``attack.methods`` can run: it would have no worst case to report."""
    methods = ",".join(str(m) for m in ac.methods)
    raise NoAttackRuns(f"no attack of attack.methods=[{methods}] can run{where} ({'; '.join(res.skipped)}): add one "
                         "that runs here, e.g. \"attack.methods=[pgd]\"")


def _attacked(method: str, vname: str, victims: list[str], budgets: Mapping[str, Budget], venv: MultiAgentVecEnv,
              team: TeamPolicy, ac: Any, seed: int, surrogate: TeamPolicy | None, critic: TeamPolicy | None,
              target: Sequence[str] | None, faults: Sequence[ObsTransform | ActionTransform],
              res: RobustnessResult, attacked: TeamPolicy | None = None,
              eps: float | None = None) -> list[EpisodeRecord] | None:
    """The episodes of one suite attack on ``victims`` (set ``vname``) inside ``budgets`` (radius ``eps``), crafted
    on ``attacked`` where given, a learned attack's training curve kept in ``res.training``; None, with a note in
    ``res.skipped``, where the lookahead cannot branch these victims or this env."""
    if method == "offsets":
        return worst_offsets(venv, team, victims, budgets, ac.offset_candidates, ac.episodes, seed, target, faults)
    curve = TrainingCurve() if method in LEARNED else None
    try:
        transforms = suite_transforms(method, venv, team, victims, budgets, ac, seed, surrogate, critic, target,
                                      attacked, curve)
        recs = run_episodes(venv, team, ac.episodes, seed, transforms=[*faults, *transforms])
    except NotBranchable as e:  # raised by the lookahead only
        res.skipped.append(f"{method} on victims {vname}: {e}")
        return None
    if curve is not None:
        res.training.setdefault(vname, {}).setdefault(method, {})[eps] = curve.points
    return recs


def _return_flags(res: RobustnessResult, vname: str, victims: Sequence[str], ac: Any,
                  clean_recs: Sequence[EpisodeRecord]) -> list[Flag]:
    """The return-level masking checks of one victim set against the clean episodes ``clean_recs``, on the
    team return of every agent (the collapse check on victims ``all``). With several teams they read the return of the victims' team (the collapse
    check when the whole team is attacked) and each flag names it; they are skipped, with a note in
    ``res.skipped``, when the victims play on several teams (an attack moves opposing teams' returns in
    opposite directions) or their team's clean return is no better than random (no gain to lose)."""
    collapse = float(ac.collapse_eps) if ac.collapse_eps else None
    if not res.teams:
        return return_checks(res.episodes[vname], res.clean_episodes, res.random, ac.masking_tolerance,
                             collapse if vname == "all" else None, res.seed, ac.n_boot, ac.objective_tolerance)
    team = victims_team(res.teams, victims)
    if team is None:
        res.skipped.append(f"return-level masking checks on victims {vname}: they play on several teams")
        return []
    if res.team_clean[team] <= res.team_random[team]:
        res.skipped.append(f"return-level masking checks on victims {vname}: the clean return of team {team} is "
                           "no better than random")
        return []
    whole = set(res.teams[team]) <= set(victims)
    # a team return is NaN in an episode none of its agents took part in: compare the episodes where it is not
    clean, cells = team_arrays(clean_recs, res.teams[team]), res.team_episodes[team][vname]
    keep = np.isfinite(clean) & np.all([np.isfinite(x) for r in cells.values() for x in r.values()], axis=0)
    kept = {a: {e: x[keep] for e, x in r.items()} for a, r in cells.items()}
    return [Flag(f.name, f"team {team}: {f.detail}")
            for f in return_checks(kept, clean[keep], res.team_random[team], ac.masking_tolerance,
                                   collapse if whole else None, res.seed, ac.n_boot, ac.objective_tolerance)]


def suite_transforms(method: str, venv: MultiAgentVecEnv, team: TeamPolicy, victims: list[str],
                     budgets: Mapping[str, Budget], ac: Any, seed: int, surrogate: TeamPolicy | None,
                     critic: TeamPolicy | None, target: Sequence[str] | None = None,
                     attacked: TeamPolicy | None = None,
                     curve: TrainingCurve | None = None) -> list[ObsTransform | ActionTransform]:
    """The transforms of a per-step suite attack (the learned adversary and the director are trained here
    first, to lower the mean return of ``target``, None: of every agent; ``curve`` records their training),
    crafted on ``attacked`` where given (transfer: on the surrogate)."""
    if method == "targeted_lookahead":
        branching = Branching(venv.spec, venv.groups, venv.backend)
        # the targeted PGD of targeted_random (with the lookahead's restarts) realises the target; its own target
        # choice is not used
        force = replace(suite_attack("targeted_random", ac), restarts=ac.lookahead_restarts)
        return LookaheadAttack(force, victims, budgets, branching, ac.lookahead_horizon,
                               ac.lookahead_gamma, critic if ac.lookahead_critic else None, ac.frequency,
                               ac.lookahead_joint, sides=None if target is None else {"attacked": target}).transforms()
    if method == "learned":
        model = train_adversary(venv.spec, team, victims, budgets, ac.learned_steps, seed, n_envs=ac.learned_envs,
                                ppo_kwargs=dict(ac.learned_ppo), frequency=ac.frequency, target=target, curve=curve)
        return [LearnedAdversary(model, victims, budgets, ac.frequency)]
    if method == "director":
        # the targeted PGD of targeted_random realises the targets; its own target choice is not used
        force = suite_attack("targeted_random", ac)
        model = train_adversary(venv.spec, team, victims, budgets, ac.director_steps, seed, n_envs=ac.director_envs,
                                ppo_kwargs=dict(ac.director_ppo), frequency=ac.frequency, target=target,
                                director=force, curve=curve, reachable=ac.director_reachable)
        return [DirectorAttack(model, victims, budgets, force, ac.frequency, ac.director_reachable)]
    return [AttackTransform(suite_attack(method, ac), victims, budgets, ac.frequency,
                            surrogate=surrogate if method == "transfer" else attacked, critic=critic)]


def worst_offsets(venv: MultiAgentVecEnv, team: TeamPolicy, victims: list[str], budgets: Mapping[str, Budget],
                  candidates: int, episodes: int, seed: int, target: Sequence[str] | None = None,
                  faults: Sequence[ObsTransform | ActionTransform] = ()) -> list[EpisodeRecord]:
    """Per episode seed, the record of the constant offset (of ``candidates``, ConstantOffset seeds ``seed..``)
    with the lowest team return (mean return of the ``target`` agents when given): every candidate replays the
    same episodes under ``faults``, as an attacker with a simulator could."""
    by_seed: dict[int, list[EpisodeRecord]] = {}
    for k in range(candidates):
        for r in run_episodes(venv, team, episodes, seed, transforms=[*faults, ConstantOffset(victims, budgets, seed + k)]):
            by_seed.setdefault(r.seed, []).append(r)
    score = (lambda r: r.team_return) if target is None else (lambda r: team_return(r, target))
    return [min(same, key=score) for _, same in sorted(by_seed.items())]


def _probe(venv: MultiAgentVecEnv, team: TeamPolicy, budgets: Mapping[str, Budget], ac: Any, seed: int,
           surrogate: TeamPolicy | None, res: RobustnessResult) -> None:
    """Objective-level checks per group on observations from clean greedy episodes."""
    raw, _ = collect_round(venv, team, seed, True, episodes=max(2, venv.num_envs))
    gen = torch.Generator(device=team.device).manual_seed(seed)
    for g in team.groups:
        x = team.normalizers[g.name].normalize(raw[g.name][: ac.probe_observations].to(team.device))
        reached, flags = probe(team[g.name], x, budgets[g.name], suite_attack("pgd", ac), gen,
                               surrogate=surrogate[g.name] if surrogate is not None else None,
                               tolerance=ac.probe_tolerance)
        res.probes[g.name] = reached
        res.add_checks(f"probe:{g.name}", flags)


def curves_figure(results: Mapping[str, RobustnessResult], victims: str, title: str) -> Figure:
    """Per policy (columns): team return vs eps, one line per attack, the worst case over the attacks on
    ``victims`` and its evaluated subsets (each point named by its attack), clean and random as references (top;
    with several teams, each team's worst case from its clean return at eps 0, its random return dashed);
    each agent's return under the worst-case attack (for its team) at each eps, from its clean return (bottom)."""
    fig, axes = pyplot().subplots(2, len(results), figsize=(4.2 * len(results), 6.4), squeeze=False, sharey="row")
    for col, (name, res) in enumerate(results.items()):
        team_ax, agent_ax = axes[0][col], axes[1][col]
        eps = res.suite_eps(victims)
        if res.teams:
            for team in res.teams:
                worst_team = [res.worst(victims, e, team)[1] for e in eps]
                (line,) = team_ax.plot([0.0, *eps], [res.team_clean[team], *worst_team], marker="o",
                                       label=f"{team}: worst case")
                team_ax.axhline(res.team_random[team], color=line.get_color(), ls="--", lw=1, label=f"{team}: random")
        else:
            for attack, by_eps in res.returns.get(victims, {}).items():
                team_ax.plot(sorted(by_eps), [by_eps[e] for e in sorted(by_eps)], marker="o", label=attack)
            # over the attacks on the set and on its evaluated subsets, each point named by its attack
            worst = [res.worst(victims, e) for e in eps]
            team_ax.plot(eps, [r for _, r in worst], color="k", ls=":", lw=2, marker="s", label="worst case")
            for e, (attack, r) in zip(eps, worst):
                team_ax.annotate(attack, (e, r), textcoords="offset points", xytext=(3, -9), fontsize=6)
            team_ax.axhline(res.clean, color="k", lw=1, label="clean")
            team_ax.axhline(res.random, color="gray", ls="--", lw=1, label="random policy")
        team_ax.set_title(f"{name} (victims: {victims})", fontsize=9)
        worst = {team: [res.worst_agents(victims, e, team)[1] for e in eps] for team in [*res.teams, None]}
        for agent, clean in res.clean_agents.items():
            agent_ax.plot([0.0, *eps], [clean, *(w[agent] for w in worst[res.team_of(agent)])], marker="o", label=agent)
        agent_ax.set_xlabel("eps (normalised units)")
    axes[0][0].set_ylabel("team return")
    axes[1][0].set_ylabel("agent return, worst-case attack")
    for row in axes:  # beside the last panel of each row, not over its lines
        row[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def markdown_report(results: Mapping[str, RobustnessResult], env_id: str, episodes: int) -> str:
    """Tables per victim set: clean, each attack at each eps, worst case (with several teams, one table per
    team and victim set: the team's return and its own worst case); each agent's return under the worst case;
    then the masking flags."""
    teams = any(res.teams for res in results.values())
    whose = "mean return of each team (over its agents)" if teams else "mean team return"
    lines = [f"# Robustness on {env_id}", "", f"{episodes} episodes per cell (same seeds everywhere), greedy actions, "
             f"{whose}; eps in normalised units (standard deviations).", ""]
    for name, res in results.items():
        if res.teams:
            lines += [f"## {name}", "", teams_line(res.teams), ""]
            for team in res.teams:
                lines += [f"### team {team}: clean {res.team_clean[team]:.2f}, random policy "
                          f"{res.team_random[team]:.2f}", ""]
                lines += _victim_tables(res, team)
        else:
            lines += [f"## {name}: clean {res.clean:.2f}, random policy {res.random:.2f}", ""]
            lines += _victim_tables(res, None)
        lines += _agent_table(res)
        flagged = [(k, f) for k, fl in res.flags.items() for f in fl]
        if not res.checked:
            lines.append(f"Gradient-masking checks: {CHECKS_NOT_RUN}")
        else:
            lines.append("Gradient-masking checks: " + ("none fired" if not flagged else ""))
        lines += [f"- **{f.name}** ({k}): {f.detail}" for k, f in flagged]
        lines += [f"- skipped {s}" for s in res.skipped]
        lines += [f"- degenerate attack ({k}): {f.detail}" for k, fl in res.degenerate.items() for f in fl]
        if any(a.startswith(TARGETED_PREFIX) for a in res.attacks()):
            missed = [(k, f) for k, fl in res.objective.items() for f in fl]
            lines.append("Objective check (targeted vs untargeted attacks): " + ("none fired" if not missed else ""))
            lines += [f"- **{f.name}** ({k}): {f.detail}" for k, f in missed]
        if any(a in LEARNED for a in res.attacks()):
            weak = [(k, f) for k, fl in res.under_trained.items() for f in fl]
            lines.append("Learned attacks at full strength (at or below the strongest gradient attack): "
                         + ("all" if not weak else ""))
            lines += [f"- **{f.name}** ({k}): {f.detail}" for k, f in weak]
        lines += ["", "Threat models:", *(f"- `{a}`: {THREAT_MODELS[a]}" for a in res.attacks())]
        lines.append("")
    return "\n".join(lines)


def _victim_tables(res: RobustnessResult, team: str | None) -> list[str]:
    """Markdown lines: per victim set, the return of ``team`` (None: of every agent) under each attack at
    each eps, and the worst case for it."""
    lines = []
    for vname, table in res.returns_of(team).items():
        eps_all = sorted({e for r in table.values() for e in r})
        suite = res.suite_eps(vname, team)
        lines += [f"victims: **{vname}**", "", "| attack | " + " | ".join(
            f"eps {e:g}" + ("" if e in suite else " (collapse check, PGD only)") for e in eps_all) + " |",
                  "|---|" + "---|" * len(eps_all)]
        for attack, by_eps in table.items():
            lines.append(f"| {attack} | " + " | ".join(f"{by_eps[e]:.2f}" if e in by_eps else "" for e in eps_all) + " |")
        worst = [_worst_cell(res, vname, e, team) if e in suite else "" for e in eps_all]
        lines.append("| **worst case** | " + " | ".join(worst) + " |")
        lines.append("")
    return lines


def _worst_cell(res: RobustnessResult, victims: str, eps: float, team: str | None) -> str:
    """The worst case's table cell: its mean return with a 95% bootstrap CI over the episodes (few episodes
    leave a wide one, which a mean alone would hide) and the attack that reached it."""
    subset, attack, ret = res.worst_from(victims, eps, team)
    x = res.cells_of(team)[subset][attack][eps]
    lo, hi = bootstrap_ci(x[~np.isnan(x)], np.mean, n_boot=res.n_boot, seed=res.seed)
    return f"{ret:.2f} [{lo:.2f}, {hi:.2f}] ({_worst_name(victims, subset, attack)})"


def _agent_table(res: RobustnessResult) -> list[str]:
    """Markdown lines: each agent's mean return, clean and under the worst-case attack of every victim set
    and eps (which agent pays for an attack on another is what the team return hides); with several teams,
    under each team's worst case (column ``worst for``)."""
    agents = list(res.clean_agents)
    sides: list[str | None] = list(res.teams) or [None]
    side_col = ["worst for"] if res.teams else []
    lines = ["Per-agent mean return under the worst-case attack (every attack's: `agent_returns` in the JSON):", "",
             "| " + " | ".join(["victims", "eps", *side_col, "attack", *agents]) + " |",
             "|---|---|---|" + "---|" * (len(agents) + len(side_col)),
             "| clean | " + "| " * (1 + len(side_col)) + "| " + " | ".join(f"{res.clean_agents[a]:.2f}" for a in agents)
             + " |"]
    for vname in res.episodes:
        for e in res.suite_eps(vname):
            for side in sides:
                attack, by_agent = res.worst_agents(vname, e, side)
                lines.append("| " + " | ".join([vname, f"{e:g}", *([side] if side else []), attack,
                                                *(f"{by_agent[a]:.2f}" for a in agents)]) + " |")
    return [*lines, ""]
