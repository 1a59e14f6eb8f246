"""What the evaluating stages print and log about their results: retention, warnings, the results block and the
HParams-tab metrics."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from madistill.evaluate.report import side_stats, sides_of

if TYPE_CHECKING:
    from omegaconf import DictConfig


def side_tag(side: str | None) -> str:
    """Prefix of a side's scalar names: none for the team of every agent, ``<team>_`` for one of several teams."""
    return "" if side is None else f"{side}_"


def retention(summaries: dict[str, dict], team: str | None = None) -> float:
    """The student's share of the teacher's gain over random (mean returns of ``team``; None: of every agent);
    NaN when the teacher is no better than random, where a share of its gain means nothing."""
    s, t, r = (side_stats(summaries[n], team)["mean"] for n in ("student", "teacher", "random"))
    return float((s - r) / (t - r)) if t > r else float("nan")


def recovery(student_worst: float, teacher_clean: float, teacher_worst: float) -> float:
    """The share of the teacher's loss under attack that the student's worst-case return gets back:
    ``(student_worst - teacher_worst) / (teacher_clean - teacher_worst)``. Measured from the teacher's clean
    return, so a student cannot buy recovery with a worse clean return; NaN when the attack costs the teacher
    nothing, where a share of its loss means nothing."""
    loss = teacher_clean - teacher_worst
    return float((student_worst - teacher_worst) / loss) if loss > 0 else float("nan")


def retentions(summaries: dict[str, dict]) -> dict[str | None, float]:
    """Retention of every side (``sides_of``): of the one team of every agent, or of each of several teams,
    never of the mean over opposing sides."""
    return {side: retention(summaries, side) for side in sides_of(summaries)}


def worse_than_random(summaries: dict[str, dict]) -> list[str]:
    """A warning for each student (row ``student...``) whose mean return is below the random team's: the team
    of every agent, or with several teams each team's own where the teacher's beats random (an opposing side
    whose teacher loses to the other side's is below random by the game, which retention already reports)."""
    if "random" not in summaries:
        return []
    out = []
    for side in sides_of(summaries):
        rnd = side_stats(summaries["random"], side).get("mean")
        teacher = side_stats(summaries.get("teacher", {}), side).get("mean")
        if side is not None and rnd is not None and teacher is not None and teacher <= rnd:
            continue
        whose = "team return" if side is None else f"return for team {side}"
        out += [f"warning: {name}'s mean {whose} {side_stats(s, side)['mean']:.2f} is below the random team's "
                f"{rnd:.2f}: check that its teacher beats random, then distil longer (distill.rounds, "
                "distill.agent_steps_per_round)"
                for name, s in summaries.items()
                if rnd is not None and name.startswith("student") and side_stats(s, side).get("mean", rnd) < rnd]
    return out


def command_line(prefixes: Sequence[str] = ()) -> list[str]:
    """This run's command-line settings but the policy and Hydra's own (only those under ``prefixes`` where given),
    for the re-evaluation command to repeat."""
    from madistill.stages.policies import command_line_overrides

    # of Hydra's own settings only the config search path, without which an env file of the user's is not found
    given = command_line_overrides(("hydra.searchpath",))
    task = [o for o in given if o.startswith("hydra.searchpath=") or not o.startswith(("hydra.", "eval.policy="))]
    return [o for o in task if o.startswith(tuple(prefixes))] if prefixes else task


def reevaluation(with_teacher: bool) -> list[str]:
    """The settings a stage that evaluated its students (distill, finetune, pipeline) passes the re-evaluation
    command, so that it repeats the stage's table: ``eval.with_teacher=true`` where the teacher lives in another
    run, and the command line's settings the evaluation reads (``eval.*``, the env and its copies, which the
    random team's shared stream depends on, the seed of the bootstrap intervals, and the presets that may set
    them)."""
    read = ("eval.", "+eval.", "env=", "env.", "+env.", "seed=", "+experiment=", "hydra.searchpath=")
    return [*(["eval.with_teacher=true"] if with_teacher else []), *command_line(read)]


def retention_lines(summaries: dict[str, dict]) -> list[str]:
    """The share of the teacher's gain over random the student keeps, from the return means (per team where
    there are several), where the summaries hold a teacher, a student and a random team."""
    if not {"teacher", "student", "random"} <= set(summaries):
        return []
    lines = []
    for side, kept in retentions(summaries).items():
        whose = "team-return means" if side is None else f"return means of team {side}"
        lines.append(f"the student keeps {100 * kept:.1f}% of the teacher's gain over random ({whose})" if kept == kept
                     else f"retention{'' if side is None else ' of ' + side}: n/a (the teacher is no better than "
                     "random: train it longer)")
    return lines


def print_results(cfg: DictConfig, run_dir: Path, summaries: dict[str, dict], policies: Path,
                  notes: Sequence[str] = (), again: Sequence[str] = ()) -> None:
    """Where the results are; ``policies`` is the run (or policy) directory that was evaluated; ``notes``: lines
    on how it was evaluated (a fault, a purifier, the alerts), printed before the report's path; ``again``: the
    settings the re-evaluation command repeats."""
    from madistill.stages.rundir import tensorboard_line

    lines = ["", "Results"]
    sides = sides_of(summaries)
    for name, s in summaries.items():
        for side in sides:
            t = side_stats(s, side)
            lines.append(f"  {name:<10} team {'' if side is None else side + ' '}return IQM {t['iqm']:.2f} "
                         f"[{t['iqm_ci'][0]:.2f}, {t['iqm_ci'][1]:.2f}], mean {t['mean']:.2f}")
    lines += [f"  {line}" for line in retention_lines(summaries)]
    lines += [
        *(f"  {n}" for n in notes),
        f"  report:      {run_dir / 'reports' / 'eval.md'}",
        f"  policies:    {policies}",
        f"  {tensorboard_line(cfg, run_dir)}",
        f"  re-evaluate: madistill evaluate {' '.join(shlex.quote(a) for a in (f'eval.policy={policies}', *again))}",
        *worse_than_random(summaries),  # last, where it is seen
    ]
    print("\n".join(lines))


def run_metrics(summaries: dict[str, dict], history: list[dict[str, float]] | None = None) -> dict[str, float]:
    """HParams-tab metrics: team return IQM per policy, the student's retention, final distillation metrics."""
    metrics = {f"hparam/{name}_{side_tag(side)}team_return": side_stats(s, side)["iqm"]
               for name, s in summaries.items() for side in sides_of({name: s})}
    if {"teacher", "student", "random"} <= set(summaries):
        for side, kept in retentions(summaries).items():
            metrics["hparam/retention" if side is None else f"hparam/retention_{side}"] = kept
    for k, v in (history[-1] if history else {}).items():
        if k.endswith(("agreement", "saliency_spearman", "saliency_topk")) and np.isfinite(v):
            metrics[f"hparam/{k}"] = v
    return metrics
