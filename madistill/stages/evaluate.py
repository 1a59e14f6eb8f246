"""``madistill evaluate``: returns of saved policies next to a random team, with bootstrap CIs."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from madistill.stages.registry import Stage

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from madistill.envs.episodes import EpisodeRecord
    from madistill.envs.factory import EnvSpec
    from madistill.envs.teams import Teams
    from madistill.evaluate.evaluator import PolicyRef
    from madistill.tb import TBLogger


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Evaluate every saved policy under ``eval.policy`` and say where the results are."""
    from madistill.stages.faults import played_under
    from madistill.stages.monitoring import alerts_line
    from madistill.stages.results import command_line, print_results
    from madistill.stages.rundir import open_tb

    with open_tb(cfg, run_dir) as tb:
        summaries = evaluate_policies(cfg, run_dir, cfg.eval.policy, tb)
    alerts = [alerts_line(run_dir / "reports")] if cfg.alerts.enabled else []
    print_results(cfg, run_dir, summaries, Path(cfg.eval.policy), [*played_under(cfg), *alerts], command_line())
    return summaries


def evaluate_policies(
    cfg: DictConfig, run_dir: Path, path: str | Path | Sequence[str | Path] | None, tb: TBLogger
) -> dict:
    """Evaluate every saved policy under ``path`` (a policy, run or sweep directory, or a list of them).

    The env is the one the policies were saved for, unless the command line picks another
    (``config.changes_env``), in which case the policies are checked against that env. Writes ``reports/eval_<name>.json``,
    ``reports/marl_eval.json``, ``reports/eval.md``, a figure, and TensorBoard scalars.
    """
    from collections import defaultdict

    from tqdm.auto import tqdm

    from madistill.evaluate.evaluator import check_video_writer, record_video, run_episodes, uniform_team
    from madistill.evaluate.report import markdown_table, write_markdown
    from madistill.runtime import make_vec_env
    from madistill.stages.faults import configured_faults, fault_label, played_under
    from madistill.stages.figures import return_figure
    from madistill.stages.monitoring import (
        alerts_markdown,
        check_alerts,
        log_alerts,
        watch_policy,
        write_alerts,
    )
    from madistill.stages.policies import (
        configured_purifier,
        load_policy,
        policy_labels,
        studied_policies,
        teams_for,
    )

    ec = cfg.eval
    check_video_writer(ec)
    device, refs, spec = studied_policies(
        cfg, path, "no policy to evaluate: pass eval.policy=<run or policy directory>", add_teachers=ec.with_teacher
    )
    results: dict[str, list[tuple[str, list[EpisodeRecord]]]] = defaultdict(list)

    def bar(label: str) -> str | None:
        return f"eval {label}" if cfg.logger.progress else None

    rows = setting_rows(refs)
    alerts: dict[str, dict] = {}
    with make_vec_env(cfg.env, spec) as venv:
        sides = teams_for(cfg, venv, refs)
        faults = configured_faults(cfg, venv, spec, device, sides)
        if cfg.alerts.enabled:
            check_alerts(cfg, len(venv.possible_agents))
        purifier = configured_purifier(cfg, device)
        teams = [load_policy(ref, venv.groups, device, purifier, cfg.seed) for ref in refs]
        for ref, team, row, label in zip(refs, teams, rows, policy_labels(refs)):
            recs = run_episodes(venv, team, ec.episodes, ec.seed, ec.deterministic, faults, progress=bar(label),
                                episode_streams=ec.episode_streams)
            results[row].append((ref.run, recs))
            if cfg.alerts.enabled:  # the paired runs arm their faults on their own blocks: fresh ones for them
                watched = [(fault_label(cfg), f) for f in configured_faults(cfg, venv, spec, device, sides)]
                alerts[label] = watch_policy(cfg, venv, lambda n, p: make_vec_env(cfg.env, spec, num_envs=n, seed_period=p),
                                             team, watched, ec.episodes, ec.seed, ec.deterministic,
                                             float(cfg.cascade.threshold))
        if ec.random_baseline:
            recs = run_episodes(venv, uniform_team(venv, device), ec.episodes, ec.seed, False, faults,
                                progress=bar("random"), episode_streams=ec.episode_streams)
            results["random"].append(("random", recs))
    reports = run_dir / "reports"
    # an earlier evaluation's results in this directory: its eval.md goes first (a reader takes eval.md for a
    # finished evaluation, and this one writes its own last), marl_eval.json collects this one's rows alone (they
    # merge into it), and row files this one does not write again are removed, so no reader mixes the two
    (reports / "eval.md").unlink(missing_ok=True)
    (reports / "marl_eval.json").unlink(missing_ok=True)
    summaries = {name: _summarise(cfg, reports, name, runs, spec, sides, tb) for name, runs in results.items()}
    stale = sorted(set(reports.glob("eval_*.json")) - {row_report(reports, name) for name in results})
    for p in stale:
        p.unlink()
    if stale:
        print(f"madistill: note: removed the earlier evaluation's {', '.join(p.name for p in stale)} from {reports}: "
              "this evaluation has no such row", file=sys.stderr)
    table = markdown_table(summaries)
    played = "\n\n".join(played_under(cfg))
    text = eval_report(summaries, table, spec.id, ec, sides, played)
    if alerts:
        write_alerts(reports, cfg, ec.episodes, ec.seed, alerts)
        log_alerts(tb, "eval", alerts)
        text += "\n" + alerts_markdown(alerts, cfg)
    write_markdown(reports / "eval.md", text)
    tb.text("eval/table", table)
    if cfg.logger.figures:
        tb.figure("eval/team_return", return_figure(summaries, spec.id))
    if ec.video:
        out = record_video(spec, teams[0], reports / f"episode_{refs[0].name}", ec.seed, ec.deterministic, ec.video_format,
                           cfg.env.grouping)
        tqdm.write(f"video: {out}")
    return summaries


def row_report(reports: Path, name: str) -> Path:
    """The results file of the evaluation row ``name``: ``eval_<name>.json``, the label made a file name."""
    import re

    from madistill.names import short_name

    stem = short_name(re.sub(r"[^\w.=-]+", "_", name).strip("_"))
    return reports / f"eval_{stem}.json"


def _summarise(
    cfg: DictConfig, reports: Path, name: str, runs: list[tuple[str, list[EpisodeRecord]]], spec: EnvSpec, sides: Teams,
    tb: TBLogger,
) -> dict:
    """The summary of one row's episodes (``runs``: (run, episode records) pairs), written to
    ``reports/eval_<name>.json`` and ``reports/marl_eval.json`` and logged to TensorBoard."""

    import numpy as np

    import madistill
    from madistill.envs.teams import several_teams
    from madistill.evaluate.report import side_stats, sides_of, write_json, write_marl_eval_json
    from madistill.evaluate.stats import summarize
    from madistill.stages.faults import fault_label, fault_meta
    from madistill.stages.policies import purifier_meta
    from madistill.stages.results import side_tag

    ec = cfg.eval
    records = [r for _, recs in runs for r in recs]
    strata = np.repeat(np.arange(len(runs)), [len(recs) for _, recs in runs])
    summary = summarize(records, n_boot=ec.n_boot, seed=cfg.seed, strata=strata, teams=sides)
    meta = {
        "policy": name, "runs": [run for run, _ in runs], "env": spec.to_dict(), "episodes": ec.episodes,
        "seed": ec.seed, "deterministic": ec.deterministic if name != "random" else False,
        "madistill_version": madistill.__version__, "fault": fault_meta(cfg), "purifier": purifier_meta(cfg),
    }
    if several_teams(sides):
        meta["teams"] = {team: list(agents) for team, agents in sides.items()}
    task = f"{spec.id}+{fault_label(cfg)}" if cfg.fault.victims else spec.id  # a faulted env is another task
    write_json(row_report(reports, name), summary, records, meta)
    for run, recs in runs:
        write_marl_eval_json(reports / "marl_eval.json", recs, "pettingzoo", task, name, run, teams=sides)
    for side in sides_of({name: summary}):
        for key in ("mean", "iqm"):
            tb.scalar(f"eval/{name}/{side_tag(side)}team_return_{key}", side_stats(summary, side)[key], 0)
    for agent, st in summary["agents"].items():
        tb.scalar(f"eval/{name}/return/{agent}", st["mean"], 0)
    tb.histogram(f"eval/{name}/team_return", np.array([r.team_return for r in records]), 0)
    return summary


def setting_rows(refs: Sequence[PolicyRef]) -> list[str]:
    """Each policy's row in an evaluation: its name, plus the settings that set its run apart from the other
    runs' policies of that name (``student [distill.lambda_igr=3]``). Seeds, paths, logging, parallelism
    (``RUN_ONLY``) and the run's own evaluation and alerts aside, so a seed sweep pools into one row per policy
    (CIs stratified by run) while a sweep over settings keeps them apart."""
    from omegaconf import OmegaConf

    from madistill.stages.rundir import RUN_ONLY, flat_settings

    configs = [flat_settings(OmegaConf.create(r.manifest.get("config", {}))) for r in refs]
    rows = []
    for ref, config in zip(refs, configs):
        peers = [c for r, c in zip(refs, configs) if r.name == ref.name]
        differ = sorted(k for k in set().union(*peers) if not k.startswith((*RUN_ONLY, "eval.", "alerts."))
                        and len({str(c.get(k)) for c in peers}) > 1)
        rows.append(ref.name + (f" [{', '.join(f'{k}={config.get(k)}' for k in differ)}]" if differ else ""))
    return rows


def eval_report(
    summaries: dict[str, dict], table: str, env_id: str, ec: DictConfig, teams: Teams | None = None, played: str = ""
) -> str:
    """``reports/eval.md``: what was played (``played``: the lines naming the fault and the purifier, if any) and
    what the columns mean (who plays on which team, where there are several), the table
    (``markdown_table(summaries)``, which TensorBoard shows too), and a warning for each student that does worse
    than the random team."""
    from madistill.envs.teams import several_teams, teams_line
    from madistill.stages.results import retention_lines, worse_than_random

    acting = f"{'greedy' if ec.deterministic else 'sampled'} actions" + (
        " (the random team samples uniformly)" if "random" in summaries and ec.deterministic else "")
    header = (f"# Evaluation on {env_id}\n\n{ec.episodes} episodes per run, seeds {ec.seed}..{ec.seed + ec.episodes - 1}, "
              f"{acting}; 95% stratified-bootstrap CIs.\n\n" + (f"{played}\n\n" if played else "") +
              "Team return: an episode's undiscounted return averaged over the agents. IQM (interquartile mean): the "
              "mean of the middle 50% of the episodes' team returns, less swayed by outlier episodes than the mean.\n\n")
    if several_teams(teams):
        header += teams_line(teams) + "\n\n"  # type: ignore[arg-type]
    warnings = "".join(f"\n**{w}**\n" for w in worse_than_random(summaries))
    kept = "".join(f"\n{line[0].upper()}{line[1:]}.\n" for line in retention_lines(summaries))
    return header + table + "\n" + kept + warnings


STAGE = Stage(
    name="evaluate",
    run=run,
    summary="evaluate saved policies (eval.policy=<run, policy or sweep dir>)",
    sections=("eval", "fault", "alerts", "purify"),
    writes="reports/eval.md, eval_<policy>.json, marl_eval.json, alerts.json (alerts.enabled), a figure and tb/",
    examples=("madistill evaluate eval.policy=<run> eval.episodes=200",
              "madistill evaluate eval.policy=<sweep dir>   # runs that differ only by seed are pooled"),
    policy_key="eval.policy",
)
