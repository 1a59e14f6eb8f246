"""The stages a user runs (``madistill <stage>``): each takes the composed config and its run directory."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import madistill
from madistill.envs.episodes import EpisodeRecord
from madistill.errors import MadistillError
from madistill.evaluate.evaluator import (
    discover_policies,
    record_video,
    run_episodes,
    saved_env,
    uniform_team,
)
from madistill.evaluate.report import markdown_table, write_json, write_markdown, write_marl_eval_json
from madistill.evaluate.stats import summarize
from madistill.policies.store import load_team
from madistill.runtime import env_spec, make_vec_env, resolve_device, seed_everything
from madistill.tb import TBLogger
from madistill.teacher import TeacherTrainer


def _tb(cfg: DictConfig, run_dir: Path) -> TBLogger:
    return TBLogger(run_dir / "tb", run_dir / "reports" if cfg.logger.figures else None, enabled=cfg.logger.tensorboard)


def _flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """Scalar leaves of the config (``teacher.ppo.learning_rate`` ...) for the HParams tab."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list):
            out[prefix[:-1]] = str(node)
        elif node is not None:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return {k: v for k, v in out.items() if not k.startswith(("eval.policy", "teacher.resume"))}


def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Stage: train teachers for every group; save them to ``<run>/policies/teacher``."""
    with _tb(cfg, run_dir) as tb:
        path = train_teachers(cfg, run_dir, tb)
        tb.hparams(_flat_hparams(cfg), {"hparam/train_team_return": tb.last("charts/episodic_return")})
    print(f"teachers: {path}\nTensorBoard: tensorboard --logdir {run_dir / 'tb'}\n"
          f"evaluate: madistill evaluate eval.policy={run_dir}")
    return path


def train_teachers(cfg: DictConfig, run_dir: Path, tb: TBLogger) -> Path:
    """Train teachers for every group in one vector env; save them to ``<run>/policies/teacher``."""
    seed_everything(cfg.seed, cfg.torch_threads)
    device = resolve_device(cfg.device)
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv:
        trainer = TeacherTrainer(cfg, venv, spec, device, tb)
        trainer.train(run_dir)
        return trainer.save(run_dir / "policies" / "teacher", config=OmegaConf.to_container(cfg, resolve=True))


def _override_names() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
    except ValueError:  # not running under Hydra (tests, library use)
        return []


def evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """Stage: evaluate every saved policy under ``eval.policy`` and say where the results are."""
    with _tb(cfg, run_dir) as tb:
        summaries = evaluate_policies(cfg, run_dir, cfg.eval.policy, tb)
    _print_results(run_dir, summaries, Path(cfg.eval.policy))
    return summaries


def evaluate_policies(cfg: DictConfig, run_dir: Path, path: str | Path | None, tb: TBLogger) -> dict:
    """Evaluate every saved policy under ``path`` (a policy, run or sweep directory).

    The env is the one the policies were saved for, unless the command line names ``env=...``/``env.*``,
    in which case the policies are checked against that env. Writes ``reports/eval_<name>.json``,
    ``reports/marl_eval.json``, ``reports/eval.md``, a figure, and TensorBoard scalars.
    """
    if not path:
        raise MadistillError("no policy to evaluate: pass eval.policy=<run or policy directory>")
    seed_everything(cfg.seed, cfg.torch_threads)
    device = resolve_device(cfg.device)
    refs = discover_policies(path, list(cfg.eval.names))
    spec = env_spec(cfg.env) if any(n.startswith("env") for n in _override_names()) else saved_env(refs)
    ec = cfg.eval
    results: dict[str, list[tuple[str, list[EpisodeRecord]]]] = defaultdict(list)
    several_runs = len({r.run for r in refs}) > 1

    def bar(label: str) -> str | None:
        return f"eval {label}" if cfg.logger.progress else None

    with make_vec_env(cfg.env, spec) as venv:
        teams = [load_team(ref.path, venv.groups, device=device)[0] for ref in refs]
        for ref, team in zip(refs, teams):
            label = f"{ref.name} ({ref.run})" if several_runs else ref.name
            recs = run_episodes(venv, team, ec.episodes, ec.seed, ec.deterministic, progress=bar(label))
            results[ref.name].append((ref.run, recs))
        if ec.random_baseline:
            recs = run_episodes(venv, uniform_team(venv, device), ec.episodes, ec.seed, False, progress=bar("random"))
            results["random"].append(("random", recs))
    reports = run_dir / "reports"
    summaries = {}
    for name, runs in results.items():
        records = [r for _, recs in runs for r in recs]
        strata = np.repeat(np.arange(len(runs)), [len(recs) for _, recs in runs])
        summaries[name] = summarize(records, n_boot=ec.n_boot, seed=cfg.seed, strata=strata)
        meta = {
            "policy": name, "runs": [run for run, _ in runs], "env": spec.to_dict(), "episodes": ec.episodes,
            "seed": ec.seed, "deterministic": ec.deterministic if name != "random" else False,
            "madistill_version": madistill.__version__,
        }
        write_json(reports / f"eval_{name}.json", summaries[name], records, meta)
        for run, recs in runs:
            write_marl_eval_json(reports / "marl_eval.json", recs, "pettingzoo", spec.id, name, run)
        team_stats = summaries[name]["team"]
        for key in ("mean", "iqm"):
            tb.scalar(f"eval/{name}/team_return_{key}", team_stats[key], 0)
        for agent, st in summaries[name]["agents"].items():
            tb.scalar(f"eval/{name}/return/{agent}", st["mean"], 0)
        tb.histogram(f"eval/{name}/team_return", np.array([r.team_return for r in records]), 0)
    table = markdown_table(summaries)
    header = f"# Evaluation on {spec.id}\n\n{ec.episodes} episodes per run, seeds {ec.seed}..{ec.seed + ec.episodes - 1}, "
    header += f"{'greedy' if ec.deterministic else 'sampled'} actions; 95% stratified-bootstrap CIs.\n\n"
    write_markdown(reports / "eval.md", header + table + "\n")
    tb.text("eval/table", table)
    if cfg.logger.figures:
        tb.figure("eval/team_return", _return_figure(summaries, spec.id))
    if ec.video:
        out = record_video(spec, teams[0], reports / f"episode_{refs[0].name}", ec.seed, ec.deterministic, ec.video_format)
        tqdm.write(f"video: {out}")
    return summaries


def _return_figure(summaries: dict[str, dict], env_id: str) -> plt.Figure:
    names = list(summaries)
    iqm = np.array([summaries[n]["team"]["iqm"] for n in names])
    ci = np.array([summaries[n]["team"]["iqm_ci"] for n in names])
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.2))
    ax.bar(names, iqm, yerr=np.abs(ci.T - iqm), capsize=4, color="tab:blue", alpha=0.8)
    ax.set_ylabel("team return (IQM, 95% CI)")
    ax.set_title(env_id)
    fig.tight_layout()
    return fig


def pipeline(cfg: DictConfig, run_dir: Path) -> dict:
    """The main job: train teachers, evaluate them next to a random team, log hparams."""
    with _tb(cfg, run_dir) as tb:
        train_teachers(cfg, run_dir, tb)
        summaries = evaluate_policies(cfg, run_dir, run_dir, tb)
        metrics = {f"hparam/{name}_team_return": s["team"]["iqm"] for name, s in summaries.items()}
        tb.hparams(_flat_hparams(cfg), metrics)
    _print_results(run_dir, summaries, run_dir)
    return summaries


def _print_results(run_dir: Path, summaries: dict[str, dict], policies: Path) -> None:
    """Where the results are; ``policies`` is the run (or policy) directory that was evaluated."""
    lines = ["", "Results"]
    for name, s in summaries.items():
        t = s["team"]
        lines.append(f"  {name:<10} team return IQM {t['iqm']:.2f} [{t['iqm_ci'][0]:.2f}, {t['iqm_ci'][1]:.2f}]")
    lines += [
        f"  report:      {run_dir / 'reports' / 'eval.md'}",
        f"  policies:    {policies}",
        f"  TensorBoard: tensorboard --logdir {run_dir / 'tb'}   (then open http://localhost:6006)",
        f"  re-evaluate: madistill evaluate eval.policy={policies}",
    ]
    print("\n".join(lines))
