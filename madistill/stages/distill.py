"""``madistill distill``: compact DIGR students distilled from a saved teacher by DAgger."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from madistill.stages.registry import Stage

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from madistill.branching import Branching
    from madistill.envs.factory import EnvSpec
    from madistill.envs.vector import MultiAgentVecEnv
    from madistill.tb import TBLogger


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Distil the teacher at ``distill.teacher`` into students; evaluate them next to it."""
    from madistill.stages.evaluate import evaluate_policies
    from madistill.stages.results import print_results, reevaluation, run_metrics
    from madistill.stages.rundir import flat_hparams, open_tb

    with open_tb(cfg, run_dir) as tb:
        teacher, history = distill_students(cfg, run_dir, cfg.distill.teacher, tb)
        summaries = evaluate_policies(cfg, run_dir, [teacher, run_dir], tb)
        tb.hparams(flat_hparams(cfg), run_metrics(summaries, history))
    print_results(cfg, run_dir, summaries, run_dir, again=reevaluation(True))
    return summaries


def lookahead_branching(cfg: DictConfig, spec: EnvSpec, venv: MultiAgentVecEnv) -> Branching | None:
    """The env's branching where DAgger collection runs under the lookahead attack
    (``distill.adv_collect_objective=targeted_lookahead``), else None; a one-line error before any work where
    the env has Box-action groups, whose targets cannot be branched over."""
    from madistill.attacks.lookahead import box_victims
    from madistill.branching import Branching
    from madistill.errors import MadistillError

    dc = cfg.distill
    if dc.adv_collect <= 0 or dc.adv_collect_objective != "targeted_lookahead":
        return None
    box = box_victims(venv.groups, [a for g in venv.groups for a in g.agents])  # every agent is a victim
    if box:
        raise MadistillError(f"distill.adv_collect_objective=targeted_lookahead branches over Discrete actions and "
                             f"group(s) {box} have Box actions: choose another distill.adv_collect_objective")
    return Branching(spec, venv.groups, venv.backend)


def distill_students(
    cfg: DictConfig, run_dir: Path, teacher_path: str | Path | None, tb: TBLogger
) -> tuple[Path, list[dict[str, float]]]:
    """DAgger + DIGR students for every group of the teacher at ``teacher_path`` (a run or policy dir),
    saved to ``<run>/policies/student``; returns the teacher's policy dir and the per-round log."""
    from omegaconf import OmegaConf

    from madistill.common.divergences import check_divergence
    from madistill.distill.trainer import DistillTrainer, student_team
    from madistill.envs.features import feature_layouts
    from madistill.envs.teams import several_teams
    from madistill.errors import MadistillError
    from madistill.evaluate.evaluator import PolicyRef
    from madistill.policies.store import load_team, save_team
    from madistill.runtime import make_vec_env, resolve_device, seed_everything
    from madistill.stages.policies import configured_features, env_for, teacher_dir, teams_for

    if not teacher_path:
        raise MadistillError("no teacher to distil: pass distill.teacher=<teacher run or policy directory>")
    seed_everything(cfg.seed, cfg.torch_threads)
    device = resolve_device(cfg.device)
    tdir = teacher_dir(teacher_path)
    refs = [PolicyRef(tdir.name, tdir, "teacher")]
    spec = env_for(cfg, refs)
    with make_vec_env(cfg.env, spec) as venv:
        teacher, _ = load_team(tdir, venv.groups, device=device)
        for discrete in {g.discrete for g in venv.groups}:
            check_divergence(cfg.distill.divergence, discrete)
        layouts = feature_layouts(venv.groups, configured_features(cfg, spec), venv.feature_names, cfg.saliency.image_patch)
        arch = {"hidden_sizes": list(cfg.student.hidden_sizes), "activation": cfg.student.activation,
                "cnn": OmegaConf.to_container(cfg.student.cnn)}
        student = student_team(teacher, arch)
        sides = teams_for(cfg, venv, refs)
        trainer = DistillTrainer(cfg, venv, teacher, student, layouts, tb, lookahead_branching(cfg, spec, venv), sides)
        trainer.train()
    config = OmegaConf.to_container(cfg, resolve=True)
    config["distill"]["teacher"] = str(tdir.resolve())
    if several_teams(sides) and not config["env"].get("teams"):
        # a custom env's teams may live only in its teacher's manifest: the student keeps the ones it was trained with
        config["env"]["teams"] = {t: list(agents) for t, agents in sides.items()}
    config["features"] = {g: dict(zip(lay.names, map(list, lay.indices))) for g, lay in layouts.items()}
    save_team(run_dir / "policies" / "student", student, spec, "student", config=config)
    return tdir, trainer.history


STAGE = Stage(
    name="distill",
    run=run,
    summary="distil a teacher (distill.teacher=<run or policy dir>) into compact DIGR students",
    sections=("distill", "student", "eval"),
    writes="policies/student",
    examples=("madistill distill distill.teacher=<run>",
              "madistill distill distill=robust distill.teacher=<run> distill.adv_eps=0.3"),
    policy_key="distill.teacher",
)
