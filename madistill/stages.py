"""The stages a user runs (``madistill <stage>``): each takes the composed config and its run directory."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import madistill
from madistill.attacks.budget import group_budgets
from madistill.attacks.robustness import CHECKS_NOT_RUN, check_methods, curves_figure, evaluate_robustness
from madistill.attacks.robustness import markdown_report as robustness_markdown
from madistill.attacks.transform import victim_sets
from madistill.common.collect import collect_round
from madistill.common.episodes import team_returns
from madistill.common.io import atomic_write_text
from madistill.config import changes_env
from madistill.distill.trainer import DistillTrainer, student_team
from madistill.envs.episodes import EpisodeRecord
from madistill.envs.factory import EnvSpec
from madistill.envs.groups import AgentGroup
from madistill.envs.teams import Teams, several_teams, team_means, teams_line
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.evaluate.evaluator import (
    PolicyRef,
    discover_policies,
    record_video,
    run_episodes,
    saved_env,
    uniform_team,
)
from madistill.evaluate.report import (
    markdown_table,
    side_stats,
    sides_of,
    write_json,
    write_markdown,
    write_marl_eval_json,
)
from madistill.evaluate.stats import summarize
from madistill.explain.report import (
    agreement_table,
    mean_heatmap,
    mean_saliency,
    per_observation_heatmaps,
    saliency_maps,
    save_arrays,
)
from madistill.explain.saliency import SaliencyLabeller, feature_layouts
from madistill.finetune import (
    actor_critic_team,
    collection_attack,
    smoothness_regularisers,
    student_from_actor,
)
from madistill.policies.base import TeamPolicy
from madistill.policies.store import find_policy_dir, load_team, read_manifest, save_team
from madistill.runtime import env_spec, env_teams, make_vec_env, resolve_device, seed_everything
from madistill.selection import BestPolicy
from madistill.tb import TBLogger
from madistill.teacher import TeacherTrainer


def _tb(cfg: DictConfig, run_dir: Path) -> TBLogger:
    return TBLogger(run_dir / "tb", run_dir / "reports" if cfg.logger.figures else None, enabled=cfg.logger.tensorboard)


# Paths and layouts: where things are, not settings to compare runs by.
_NOT_HPARAMS = ("eval.policy", "teacher.resume", "distill.teacher", "saliency.policy", "saliency.obs", "env.features")


def _setting_rows(refs: Sequence[PolicyRef]) -> list[str]:
    """Each policy's row in an evaluation: its name, plus the settings that set its run apart from the other
    runs' policies of that name (``student [distill.lambda_igr=3]``). Seeds and paths aside, so a seed sweep
    pools into one row per policy (CIs stratified by run) while a sweep over settings keeps them apart."""
    configs = [_flat_hparams(OmegaConf.create(read_manifest(r.path).get("config", {}))) for r in refs]
    rows = []
    for ref, config in zip(refs, configs):
        peers = [c for r, c in zip(refs, configs) if r.name == ref.name]
        differ = sorted(k for k in set().union(*peers) if k != "seed" and len({str(c.get(k)) for c in peers}) > 1)
        rows.append(ref.name + (f" [{', '.join(f'{k}={config.get(k)}' for k in differ)}]" if differ else ""))
    return rows


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
    return {k: v for k, v in out.items() if not k.startswith(_NOT_HPARAMS)}


def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Stage: train teachers for every group; save them to ``<run>/policies/teacher``."""
    with _tb(cfg, run_dir) as tb:
        path = train_teachers(cfg, run_dir, tb)
        tb.hparams(_flat_hparams(cfg), {"hparam/train_team_return": tb.last("charts/episodic_return")})
    print(f"teachers: {path}\nTensorBoard: tensorboard --logdir {run_dir / 'tb'}\n"
          f"evaluate: madistill evaluate eval.policy={run_dir}\n"
          f"continue: madistill train teacher.resume={run_dir / 'checkpoint'} teacher.total_agent_steps=<more>")
    return path


def train_teachers(cfg: DictConfig, run_dir: Path, tb: TBLogger) -> Path:
    """Train teachers for every group in one vector env; save them to ``<run>/policies/teacher``."""
    seed_everything(cfg.seed, cfg.torch_threads)
    device = resolve_device(cfg.device)
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv:
        with TeacherTrainer(cfg, venv, spec, device, tb) as trainer:
            trainer.train(run_dir)
        trainer.save_checkpoint(run_dir / "checkpoint")  # so a finished run can be continued to a longer budget
        return trainer.save(run_dir / "policies" / "teacher", config=OmegaConf.to_container(cfg, resolve=True))


def _overrides() -> list[str]:
    """The command line's overrides (``key=value``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra (tests, library use)
        return []


def _env_for(cfg: DictConfig, refs: list[PolicyRef]) -> EnvSpec:
    """The env the policies were saved for, unless the command line picks another (``changes_env``; the CLI
    itself adds ``env=<saved id>`` to pick the saved env's config file)."""
    saved = saved_env(refs)
    return env_spec(cfg.env) if changes_env(_overrides(), saved.id) else saved


def _teams(cfg: DictConfig, venv: MultiAgentVecEnv, refs: Sequence[PolicyRef]) -> Teams:
    """The teams of the env the policies act in: ``env.teams`` (command line or env file), else, in the env
    they were saved for, the teams they were trained with (a custom env's ``+env.teams`` lives only in their
    manifests), else inferred from the agent names."""
    saved = None
    if not changes_env(_overrides(), saved_env(refs).id):
        saved = next((t for r in refs if (t := read_manifest(r.path).get("config", {}).get("env", {}).get("teams"))),
                     None)
    return env_teams(cfg.env, venv, saved)


def evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """Stage: evaluate every saved policy under ``eval.policy`` and say where the results are."""
    with _tb(cfg, run_dir) as tb:
        summaries = evaluate_policies(cfg, run_dir, cfg.eval.policy, tb)
    _print_results(run_dir, summaries, Path(cfg.eval.policy))
    return summaries


def evaluate_policies(
    cfg: DictConfig, run_dir: Path, path: str | Path | Sequence[str | Path] | None, tb: TBLogger
) -> dict:
    """Evaluate every saved policy under ``path`` (a policy, run or sweep directory, or a list of them).

    The env is the one the policies were saved for, unless the command line picks another
    (``config.changes_env``), in which case the policies are checked against that env. Writes ``reports/eval_<name>.json``,
    ``reports/marl_eval.json``, ``reports/eval.md``, a figure, and TensorBoard scalars.
    """
    device, refs, spec = _studied_policies(
        cfg, path, "no policy to evaluate: pass eval.policy=<run or policy directory>", add_teachers=False
    )
    ec = cfg.eval
    results: dict[str, list[tuple[str, list[EpisodeRecord]]]] = defaultdict(list)
    several_runs = len({r.run for r in refs}) > 1

    def bar(label: str) -> str | None:
        return f"eval {label}" if cfg.logger.progress else None

    rows = _setting_rows(refs)
    with make_vec_env(cfg.env, spec) as venv:
        sides = _teams(cfg, venv, refs)
        teams = [load_team(ref.path, venv.groups, device=device)[0] for ref in refs]
        for ref, team, row in zip(refs, teams, rows):
            label = f"{ref.name} ({ref.run})" if several_runs else ref.name
            recs = run_episodes(venv, team, ec.episodes, ec.seed, ec.deterministic, progress=bar(label),
                                episode_streams=ec.episode_streams)
            results[row].append((ref.run, recs))
        if ec.random_baseline:
            recs = run_episodes(venv, uniform_team(venv, device), ec.episodes, ec.seed, False, progress=bar("random"),
                                episode_streams=ec.episode_streams)
            results["random"].append(("random", recs))
    reports = run_dir / "reports"
    summaries = {}
    for name, runs in results.items():
        records = [r for _, recs in runs for r in recs]
        strata = np.repeat(np.arange(len(runs)), [len(recs) for _, recs in runs])
        summaries[name] = summarize(records, n_boot=ec.n_boot, seed=cfg.seed, strata=strata, teams=sides)
        meta = {
            "policy": name, "runs": [run for run, _ in runs], "env": spec.to_dict(), "episodes": ec.episodes,
            "seed": ec.seed, "deterministic": ec.deterministic if name != "random" else False,
            "madistill_version": madistill.__version__,
        }
        if several_teams(sides):
            meta["teams"] = {team: list(agents) for team, agents in sides.items()}
        stem = re.sub(r"[^\w.=-]+", "_", name).strip("_")  # a row label as a file name
        write_json(reports / f"eval_{stem}.json", summaries[name], records, meta)
        for run, recs in runs:
            write_marl_eval_json(reports / "marl_eval.json", recs, "pettingzoo", spec.id, name, run, teams=sides)
        for side in sides_of({name: summaries[name]}):
            for key in ("mean", "iqm"):
                tb.scalar(f"eval/{name}/{_side_tag(side)}team_return_{key}", side_stats(summaries[name], side)[key], 0)
        for agent, st in summaries[name]["agents"].items():
            tb.scalar(f"eval/{name}/return/{agent}", st["mean"], 0)
        tb.histogram(f"eval/{name}/team_return", np.array([r.team_return for r in records]), 0)
    table = markdown_table(summaries)
    write_markdown(reports / "eval.md", eval_report(summaries, spec.id, ec, sides))
    tb.text("eval/table", table)
    if cfg.logger.figures:
        tb.figure("eval/team_return", _return_figure(summaries, spec.id))
    if ec.video:
        out = record_video(spec, teams[0], reports / f"episode_{refs[0].name}", ec.seed, ec.deterministic, ec.video_format,
                           cfg.env.grouping)
        tqdm.write(f"video: {out}")
    return summaries


def eval_report(summaries: dict[str, dict], env_id: str, ec: DictConfig, teams: Teams | None = None) -> str:
    """``reports/eval.md``: what was played and what the columns mean (who plays on which team, where there
    are several), the table, and a warning for each student that does worse than the random team."""
    acting = f"{'greedy' if ec.deterministic else 'sampled'} actions" + (
        " (the random team samples uniformly)" if "random" in summaries and ec.deterministic else "")
    header = (f"# Evaluation on {env_id}\n\n{ec.episodes} episodes per run, seeds {ec.seed}..{ec.seed + ec.episodes - 1}, "
              f"{acting}; 95% stratified-bootstrap CIs.\n\n"
              "Team return: an episode's undiscounted return averaged over the agents. IQM (interquartile mean): the "
              "mean of the middle 50% of the episodes' team returns, less swayed by outlier episodes than the mean.\n\n")
    if several_teams(teams):
        header += teams_line(teams) + "\n\n"  # type: ignore[arg-type]
    warnings = "".join(f"\n**{w}**\n" for w in worse_than_random(summaries))
    return header + markdown_table(summaries) + "\n" + warnings


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


def _return_figure(summaries: dict[str, dict], env_id: str) -> plt.Figure:
    """Team return IQM per policy; with several teams, one bar per team side by side."""
    names, sides = list(summaries), sides_of(summaries)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names) * len(sides), 3.2))
    width, x = 0.8 / len(sides), np.arange(len(names))
    for k, side in enumerate(sides):
        iqm = np.array([side_stats(summaries[n], side)["iqm"] for n in names])
        ci = np.array([side_stats(summaries[n], side)["iqm_ci"] for n in names])
        ax.bar(x + (k - (len(sides) - 1) / 2) * width, iqm, width, yerr=np.abs(ci.T - iqm), capsize=4, alpha=0.8,
               label=side)
    ax.set_xticks(x, names)
    if sides != [None]:
        ax.legend(fontsize=8)
    ax.set_ylabel("team return (IQM, 95% CI)")
    ax.set_title(env_id)
    fig.tight_layout()
    return fig


def distill(cfg: DictConfig, run_dir: Path) -> dict:
    """Stage: distil the teacher at ``distill.teacher`` into students; evaluate them next to it."""
    with _tb(cfg, run_dir) as tb:
        teacher, history = distill_students(cfg, run_dir, cfg.distill.teacher, tb)
        summaries = evaluate_policies(cfg, run_dir, [teacher, run_dir], tb)
        tb.hparams(_flat_hparams(cfg), _run_metrics(summaries, history))
    _print_results(run_dir, summaries, run_dir)
    return summaries


def distill_students(
    cfg: DictConfig, run_dir: Path, teacher_path: str | Path | None, tb: TBLogger
) -> tuple[Path, list[dict[str, float]]]:
    """DAgger + DIGR students for every group of the teacher at ``teacher_path`` (a run or policy dir),
    saved to ``<run>/policies/student``; returns the teacher's policy dir and the per-round log."""
    if not teacher_path:
        raise MadistillError("no teacher to distil: pass distill.teacher=<teacher run or policy directory>")
    seed_everything(cfg.seed, cfg.torch_threads)
    device = resolve_device(cfg.device)
    tdir = teacher_dir(teacher_path)
    spec = _env_for(cfg, [PolicyRef(tdir.name, tdir, "teacher")])
    with make_vec_env(cfg.env, spec) as venv:
        teacher, _ = load_team(tdir, venv.groups, device=device)
        layouts = feature_layouts(venv.groups, _configured_features(cfg, spec), venv.feature_names, cfg.saliency.image_patch)
        arch = {"hidden_sizes": list(cfg.student.hidden_sizes), "activation": cfg.student.activation,
                "cnn": OmegaConf.to_container(cfg.student.cnn)}
        student = student_team(teacher, arch)
        trainer = DistillTrainer(cfg, venv, teacher, student, layouts, tb)
        trainer.train()
    config = OmegaConf.to_container(cfg, resolve=True)
    config["distill"]["teacher"] = str(tdir.resolve())
    config["features"] = {g: dict(zip(lay.names, map(list, lay.indices))) for g, lay in layouts.items()}
    save_team(run_dir / "policies" / "student", student, spec, "student", config=config)
    return tdir, trainer.history


def finetune(cfg: DictConfig, run_dir: Path) -> dict:
    """Stage: robust RL fine-tuning (SA-PPO) of the student at ``finetune.policy``; evaluate it next to its teacher."""
    with _tb(cfg, run_dir) as tb:
        teacher = finetune_students(cfg, run_dir, cfg.finetune.policy, tb)
        summaries = evaluate_policies(cfg, run_dir, [teacher, run_dir], tb)
        tb.hparams(_flat_hparams(cfg), _run_metrics(summaries))
    _print_results(run_dir, summaries, run_dir)
    return summaries


def finetune_students(cfg: DictConfig, run_dir: Path, student_path: str | Path | None, tb: TBLogger) -> Path:
    """PPO with SA-PPO's smoothness regulariser on the students at ``student_path`` (a distill run or student
    policy dir), from their actors and their teacher's critics; saves ``<run>/policies/student`` with the same
    teacher link and returns the teacher's policy dir."""
    if not student_path:
        raise MadistillError("no student to fine-tune: pass finetune.policy=<distill run or student policy directory>")
    seed_everything(cfg.seed, cfg.torch_threads)
    device = resolve_device(cfg.device)
    sdir = run_policy_dir(student_path, "student")
    ref = PolicyRef("student", sdir, "student")
    tdir = _distilled_from(ref)
    if tdir is None or not tdir.is_dir():
        raise MadistillError(f"{sdir} records no teacher it was distilled from (or it is gone): fine-tune a student "
                             "saved by `madistill distill`, with its teacher in place")
    spec = _env_for(cfg, [ref])
    fc = cfg.finetune
    with make_vec_env(cfg.env, spec) as venv:
        student, manifest = load_team(sdir, venv.groups, device=device)
        teacher, _ = load_team(tdir, venv.groups, device=device)
        layouts = feature_layouts(venv.groups, _configured_features(cfg, spec), venv.feature_names, cfg.saliency.image_patch)
        budgets = group_budgets(1.0, layouts, cfg.attack.exclude, device, cfg.attack.scale)
        attack = collection_attack(venv.groups, budgets, fc)
        regularisers = smoothness_regularisers(venv.groups, budgets, fc, cfg.seed, device)
        with TeacherTrainer(cfg, venv, spec, device, tb, actor_critic_team(student, teacher), attack,
                            total_agent_steps=fc.total_agent_steps, learning_rate=fc.learning_rate,
                            episode_seed=finetune_episode_seed(cfg.seed), extra_losses=regularisers) as trainer, \
                ExitStack() as stack:
            if fc.select_every > 0:  # validation plays its own episodes: the trainer's env copies are mid-episode
                best = BestPolicy(stack.enter_context(make_vec_env(cfg.env, spec)), budgets, cfg.attack,
                                  list(fc.select_attacks), fc.eps, fc.select_episodes, fc.select_robust_weight,
                                  finetune_validation_seed(cfg.seed), tb)
                best.offer(0, student)
                trainer.train(run_dir, lambda step, team: best.offer(step, student_from_actor(team, student)),
                              fc.select_every)
                best.save(run_dir / "reports" / "selection.json")
                tuned = best.team
                tqdm.write(f"selected the student of step {best.best.step} of {trainer.agent_steps}: validation "
                           f"clean {best.best.clean:.2f}, worst {best.best.worst:.2f} (reports/selection.json)")
            else:
                tuned = student_from_actor(trainer.train(run_dir), student)
    config = OmegaConf.to_container(cfg, resolve=True)
    saved = manifest.get("config", {})
    config["distill"] = {**saved.get("distill", {}), "teacher": str(tdir)}  # how the student was distilled, and from what
    config["features"] = saved.get("features", {})
    config["finetune"]["policy"] = str(sdir.resolve())
    save_team(run_dir / "policies" / "student", tuned, spec, "student", config=config)
    return tdir


def finetune_episode_seed(seed: int) -> int:
    """The first episode seed of fine-tuning: away from the teacher's (from ``seed``), DAgger's and evaluation's."""
    return 10_000_000 * (1 + int(seed))


def finetune_validation_seed(seed: int) -> int:
    """The first validation episode seed of fine-tuning's checkpoint selection: 5M episodes past its own."""
    return finetune_episode_seed(seed) + 5_000_000


def teacher_dir(path: str | Path) -> Path:
    """A teacher policy dir, or the ``teacher`` policy of a run dir."""
    return run_policy_dir(path, "teacher")


def run_policy_dir(path: str | Path, name: str) -> Path:
    """The ``name`` policy of a run dir that has one, else the policy dir ``path`` (or a run's only policy)."""
    p = Path(path)
    return find_policy_dir(p, name) if (p / "policies" / name).is_dir() else find_policy_dir(p)


def _configured_features(cfg: DictConfig, spec: EnvSpec) -> dict:
    """``env.features`` when the config's env is the one the teacher acts in (feature groups are per env)."""
    if cfg.env.name != spec.name:
        return {}
    return OmegaConf.to_container(cfg.env.features, resolve=True) or {}


def _run_metrics(summaries: dict[str, dict], history: list[dict[str, float]] | None = None) -> dict[str, float]:
    """HParams-tab metrics: team return IQM per policy, the student's retention, final distillation metrics."""
    metrics = {f"hparam/{name}_{_side_tag(side)}team_return": side_stats(s, side)["iqm"]
               for name, s in summaries.items() for side in sides_of({name: s})}
    if {"teacher", "student", "random"} <= set(summaries):
        for side, kept in retentions(summaries).items():
            metrics["hparam/retention" if side is None else f"hparam/retention_{side}"] = kept
    for k, v in (history[-1] if history else {}).items():
        if k.endswith(("agreement", "saliency_spearman", "saliency_topk")) and np.isfinite(v):
            metrics[f"hparam/{k}"] = v
    return metrics


def _side_tag(side: str | None) -> str:
    """Prefix of a side's scalar names: none for the team of every agent, ``<team>_`` for one of several teams."""
    return "" if side is None else f"{side}_"


def retention(summaries: dict[str, dict], team: str | None = None) -> float:
    """The student's share of the teacher's gain over random (mean returns of ``team``; None: of every agent);
    NaN when the teacher is no better than random, where a share of its gain means nothing."""
    s, t, r = (side_stats(summaries[n], team)["mean"] for n in ("student", "teacher", "random"))
    return float((s - r) / (t - r)) if t > r else float("nan")


def retentions(summaries: dict[str, dict]) -> dict[str | None, float]:
    """Retention of every side (``sides_of``): of the one team of every agent, or of each of several teams,
    never of the mean over opposing sides."""
    return {side: retention(summaries, side) for side in sides_of(summaries)}


def saliency(cfg: DictConfig, run_dir: Path) -> dict:
    """Stage: perturbation and gradient saliency of every saved policy under ``saliency.policy``, on
    observations from ``saliency.obs`` (.npz) or from greedy episodes of the teacher (else the first policy).

    Writes ``reports/saliency.json`` (mean saliency per feature group, agreement with the teacher),
    ``reports/saliency.npz`` (observations and maps) and heatmaps (PNG and TensorBoard).
    """
    sc = cfg.saliency
    device, refs, spec = _studied_policies(
        cfg, sc.policy, "no policy to explain: pass saliency.policy=<run or policy directory>"
    )
    several = len({r.run for r in refs}) > 1
    labels = [f"{r.name}@{r.run}" if several else r.name for r in refs]
    with make_vec_env(cfg.env, spec) as venv:
        teams = {label: load_team(ref.path, venv.groups, device=device)[0] for label, ref in zip(labels, refs)}
        layouts = feature_layouts(venv.groups, _configured_features(cfg, spec), venv.feature_names, cfg.saliency.image_patch)
        own_reference = {}  # each policy's teacher (a teacher, or a policy without one, is its own)
        for label, ref in zip(labels, refs):
            i = None if ref.name == "teacher" else paired_policy(ref, "teacher", refs)
            own_reference[label] = label if i is None else labels[i]
        reference = own_reference[labels[0]]  # whose episodes give the observations
        if sc.obs:
            raw = load_observations(sc.obs, venv.groups)
        else:
            bar = "observations" if cfg.logger.progress else None
            raw, _ = collect_round(venv, teams[reference], cfg.eval.seed, True, episodes=sc.episodes, progress=bar)
    labeller = SaliencyLabeller.from_config(sc, layouts, cfg.seed)
    maps = saliency_maps(teams, raw, layouts, labeller, sc.target)
    table = agreement_table(maps, own_reference, sc.topk)
    reports = run_dir / "reports"
    result = {
        "meta": {"policies": {label: str(r.path) for label, r in zip(labels, refs)}, "references": own_reference,
                 "observations_from": reference, "env": spec.to_dict(),
                 "observations": {g: len(x) for g, x in raw.items()}, "saliency": OmegaConf.to_container(sc)},
        "agreement_with_reference_perturbation": table,
        "mean_saliency": mean_saliency(maps, layouts),
    }
    atomic_write_text(reports / "saliency.json", json.dumps(result, indent=2))
    save_arrays(reports / "saliency.npz", maps, raw)
    lines = [f"| policy | group | Spearman | top-{sc.topk} | Gini |", "|---|---|---|---|---|"]
    for name, groups in table.items():
        for g, a in groups.items():
            lines.append(f"| {name} | {g} | {a['spearman']:.3f} | {a['topk']:.3f} | {a['gini']:.3f} |")
    text = "\n".join(lines)
    with _tb(cfg, run_dir) as tb:
        tb.text("saliency/agreement", text)
        if cfg.logger.figures:
            for g, layout in layouts.items():
                tb.figure(f"saliency/{g}", mean_heatmap(maps, g, layout, f"{spec.id}: {g}"))
                tb.figure(f"saliency/{g}_per_obs", per_observation_heatmaps(maps, g, layout, sc.rows))
    print(f"\nGradient saliency vs its teacher's perturbation saliency (per observation, averaged):\n{text}\n"
          f"  maps:    {reports / 'saliency.npz'}\n  summary: {reports / 'saliency.json'}\n"
          f"  figures: {reports}/saliency_<group>.png\n  TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    return result


def _studied_policies(
    cfg: DictConfig, path: str | Path | Sequence[str | Path] | None, missing: str, add_teachers: bool = True
) -> tuple[torch.device, list[PolicyRef], EnvSpec]:
    """Seeded set-up shared by the stages that study saved policies: the device, the policies under ``path``
    (one directory or a list; with a student's teacher added unless ``add_teachers`` is off) and the env they
    act in. ``missing``: the error when no path is given."""
    if not path:
        raise MadistillError(missing)
    seed_everything(cfg.seed, cfg.torch_threads)
    device = resolve_device(cfg.device)
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    refs = [ref for p in paths for ref in discover_policies(p, list(cfg.eval.names))]
    refs = with_teachers(refs) if add_teachers else refs
    return device, refs, _env_for(cfg, refs)


def paired_policy(ref: PolicyRef, role: str, refs: Sequence[PolicyRef]) -> int | None:
    """Index in ``refs`` of the ``role`` policy that belongs with ``ref`` (a transfer surrogate, a critic): the
    one in the same run, else the teacher a student was distilled from (or that teacher's student), else the
    first of that role. In a sweep, each run's student is thus paired with its own teacher."""
    found = [i for i, r in enumerate(refs) if r.name == role and r.path != ref.path]
    same_run = [i for i in found if refs[i].run == ref.run]
    if role == "teacher":
        linked = [i for i in found if refs[i].path.resolve() == _distilled_from(ref)]
    else:
        linked = [i for i in found if _distilled_from(refs[i]) == ref.path.resolve()]
    return (same_run or linked or found or [None])[0]


def _distilled_from(ref: PolicyRef) -> Path | None:
    """The teacher directory a student's manifest records (None for other policies)."""
    manifest = read_manifest(ref.path)
    path = manifest.get("config", {}).get("distill", {}).get("teacher")
    return Path(path).resolve() if manifest.get("role") == "student" and path else None


def with_teachers(refs: list[PolicyRef]) -> list[PolicyRef]:
    """Add the teacher a student was distilled from (recorded in its manifest) when it is not listed."""
    if any(r.name == "teacher" for r in refs):
        return refs
    for r in refs:
        path = _distilled_from(r)
        if path is not None and path.is_dir():
            return [PolicyRef("teacher", path, "teacher"), *refs]
    return refs


def load_observations(path: str | Path, groups: Sequence[AgentGroup]) -> dict[str, torch.Tensor]:
    """Raw observations per group from an ``.npz`` (keys ``<group>`` or ``obs/<group>``, arrays ``[M, d]``)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k.removeprefix("obs/"): f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise MadistillError(f"cannot read observations {path} ({e}): pass an .npz with one [M, d] array per group") from e
    out = {}
    for g in groups:
        if g.name not in arrays:
            raise MadistillError(f"{path} has no observations for group {g.name!r}: add an array named {g.name!r}")
        x = np.asarray(arrays[g.name], dtype=np.float32).reshape(len(arrays[g.name]), -1)
        if x.shape[1] != g.obs_dim:
            raise MadistillError(f"{path}: {g.name!r} observations have {x.shape[1]} features, the env gives {g.obs_dim}")
        if not np.isfinite(x).all():
            raise MadistillError(f"{path}: {g.name!r} observations contain NaN or inf: clean the file")
        out[g.name] = torch.as_tensor(x)
    return out


def attack(cfg: DictConfig, run_dir: Path) -> dict:
    """Stage: robustness of every saved policy under ``attack.policy`` against the attack suite, with the
    gradient-masking checks. Writes ``reports/robustness.{json,md}``, return-vs-eps curves (PNG and
    TensorBoard) and TensorBoard scalars ``attack/<policy>/<victims>/<attack>`` over eps (x100)."""
    ac = cfg.attack
    check_methods(ac)  # a wrong attack name fails before any policy is loaded or episode run
    device, refs, spec = _studied_policies(
        cfg, ac.policy, "no policy to attack: pass attack.policy=<run, policy or sweep directory>"
    )
    results = {}
    several = len({r.run for r in refs}) > 1
    with make_vec_env(cfg.env, spec) as venv:
        loaded = [load_team(r.path, venv.groups, device=device)[0] for r in refs]
        layouts = feature_layouts(venv.groups, _configured_features(cfg, spec), venv.feature_names, cfg.saliency.image_patch)
        sides = _teams(cfg, venv, refs)
        random_recs = run_episodes(venv, uniform_team(venv, device), ac.episodes, ac.seed, False)
        random_return = team_returns(random_recs)
        extra = {k: load_team(getattr(ac, k), venv.groups, device=device)[0] for k in ("critic", "transfer_from") if getattr(ac, k)}
        n_sets = len(victim_sets(list(ac.victims), [a for g in venv.groups for a in g.agents], sides))
        per_policy = n_sets * (len(ac.methods) * len(ac.eps) + (2 if ac.checks else 0))

        def partner(ref: PolicyRef, role: str) -> TeamPolicy | None:
            i = paired_policy(ref, role, refs)
            return None if i is None else loaded[i]

        with tqdm(total=len(refs) * per_policy, desc="attack", unit="eval", disable=not cfg.logger.progress) as bar:
            for ref, team in zip(refs, loaded):
                label = f"{ref.name}@{ref.run}" if several else ref.name
                # the critic attack needs a value from one agent's observation: a centralised critic has none
                critic = extra.get("critic") or next(
                    (c for c in (team, partner(ref, "teacher")) if c is not None and _has_value(c)), None)
                surrogate = extra.get("transfer_from") or partner(ref, "student" if ref.name == "teacher" else "teacher")
                bar.set_postfix(policy=label)
                results[label] = evaluate_robustness(
                    venv, team, layouts, ac, random_return, ac.seed, surrogate=surrogate, critic=critic, progress=bar,
                    teams=sides, random_teams=team_means(random_recs, sides),
                )
    reports = run_dir / "reports"
    payload = {
        "meta": {"env": spec.to_dict(), "policies": {r.name: str(r.path) for r in refs}, "episodes": ac.episodes,
                 "seed": ac.seed, "attack": OmegaConf.to_container(ac, resolve=True)},
        "results": {n: r.to_dict() for n, r in results.items()},
    }
    atomic_write_text(reports / "robustness.json", json.dumps(payload, indent=2))
    text = robustness_markdown(results, spec.id, ac.episodes)
    write_markdown(reports / "robustness.md", text)
    victims = list(next(iter(results.values())).returns)
    with _tb(cfg, run_dir) as tb:
        tb.text("attack/report", text)
        for name, res in results.items():
            for side in [None, *res.teams]:
                for vname, table in res.returns_of(side).items():
                    for method, by_eps in table.items():
                        for eps, value in sorted(by_eps.items()):
                            tb.scalar(f"attack/{name}/{_side_tag(side)}{vname}/{method}", value, int(round(100 * eps)))
        if cfg.logger.figures:
            for vname in victims:
                tb.figure(f"attack/curves_{vname}", curves_figure(results, vname, spec.id))
    flags = sum(len(f) for r in results.values() for f in r.flags.values())
    whose = "each team's return" if several_teams(sides) else "team return"
    lines = ["", f"Robustness on {spec.id} ({whose}; worst case over the suite at each eps):"]
    eps = sorted(float(e) for e in ac.eps)
    for name, res in results.items():
        for side in list(res.teams) or [None]:
            clean = res.clean if side is None else res.team_clean[side]
            for vname in res.returns:
                worst = ", ".join(f"eps {e:g}: {value:.2f} ({attack})" for e in eps
                                  for attack, value in [res.worst(vname, e, side)])
                lines.append(f"  {name:<8} {'' if side is None else f'team {side} '}clean {clean:.2f} | victims "
                             f"{vname}: {worst}")
    for name, res in results.items():
        if "pgd" in res.seconds:
            lines.append(f"  {name:<8} evaluation wall time: clean {res.seconds['clean']:.2f} s, under PGD-{ac.steps} "
                         f"({ac.restarts} restarts) {res.seconds['pgd']:.2f} s ({res.seconds['pgd'] / res.seconds['clean']:.1f}x)")
    lines += [
        (f"  gradient-masking flags: {flags}" + (" (see the report)" if flags else "")) if ac.checks
        else f"  gradient-masking checks: {CHECKS_NOT_RUN}",
        f"  report:      {reports / 'robustness.md'}",
        f"  TensorBoard: tensorboard --logdir {run_dir / 'tb'}",
    ]
    print("\n".join(lines))
    return payload


def _has_value(team: TeamPolicy) -> bool:
    return all(team[g.name].value(torch.zeros(1, g.obs_dim, device=team.device)) is not None for g in team.groups)


def pipeline(cfg: DictConfig, run_dir: Path) -> dict:
    """The main job: train teachers, distil them into students, evaluate both next to a random team."""
    with _tb(cfg, run_dir) as tb:
        teacher = train_teachers(cfg, run_dir, tb)
        _, history = distill_students(cfg, run_dir, teacher, tb)
        summaries = evaluate_policies(cfg, run_dir, run_dir, tb)
        tb.hparams(_flat_hparams(cfg), _run_metrics(summaries, history))
    _print_results(run_dir, summaries, run_dir)
    return summaries


def _print_results(run_dir: Path, summaries: dict[str, dict], policies: Path) -> None:
    """Where the results are; ``policies`` is the run (or policy) directory that was evaluated."""
    lines = ["", "Results"]
    sides = sides_of(summaries)
    for name, s in summaries.items():
        for side in sides:
            t = side_stats(s, side)
            lines.append(f"  {name:<10} team {'' if side is None else side + ' '}return IQM {t['iqm']:.2f} "
                         f"[{t['iqm_ci'][0]:.2f}, {t['iqm_ci'][1]:.2f}]")
    if {"teacher", "student", "random"} <= set(summaries):
        for side, kept in retentions(summaries).items():
            whose = "team-return means" if side is None else f"return means of team {side}"
            lines.append(f"  the student keeps {100 * kept:.1f}% of the teacher's gain over random ({whose})"
                         if kept == kept else f"  retention{'' if side is None else ' of ' + side}: n/a (the "
                         "teacher is no better than random: train it longer)")
    lines += [
        f"  report:      {run_dir / 'reports' / 'eval.md'}",
        f"  policies:    {policies}",
        f"  TensorBoard: tensorboard --logdir {run_dir / 'tb'}   (then open http://localhost:6006)",
        f"  re-evaluate: madistill evaluate eval.policy={policies}",
        *worse_than_random(summaries),  # last, where it is seen
    ]
    print("\n".join(lines))
