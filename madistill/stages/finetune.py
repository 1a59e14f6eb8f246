"""``madistill finetune``: robust RL fine-tuning (SA-PPO) of a distilled student."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from madistill.stages.registry import Stage

if TYPE_CHECKING:
    from collections.abc import Callable

    from omegaconf import DictConfig

    from madistill.policies.base import TeamPolicy
    from madistill.tb import TBLogger


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Robust RL fine-tuning (SA-PPO) of the student at ``finetune.policy``; evaluate it next to its teacher."""
    from madistill.stages.evaluate import evaluate_policies
    from madistill.stages.results import print_results, reevaluation, run_metrics
    from madistill.stages.rundir import flat_hparams, open_tb

    with open_tb(cfg, run_dir) as tb:
        teacher = finetune_students(cfg, run_dir, cfg.finetune.policy, tb)
        summaries = evaluate_policies(cfg, run_dir, [teacher, run_dir], tb)
        tb.hparams(flat_hparams(cfg), run_metrics(summaries))
    print_results(cfg, run_dir, summaries, run_dir, again=reevaluation(True))
    return summaries


def finetune_students(cfg: DictConfig, run_dir: Path, student_path: str | Path | None, tb: TBLogger) -> Path:
    """PPO with SA-PPO's smoothness regulariser on the students at ``student_path`` (a distill run or student
    policy dir), from their actors and their teacher's critics; saves ``<run>/policies/student`` with the same
    teacher link and returns the teacher's policy dir."""
    from contextlib import ExitStack

    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    from madistill.attacks.budget import group_budgets
    from madistill.attacks.collection import training_director
    from madistill.branching import Branching, value_critic
    from madistill.envs.features import feature_layouts
    from madistill.errors import MadistillError
    from madistill.evaluate.evaluator import PolicyRef
    from madistill.finetune import (
        actor_critic_team,
        collection_attack,
        smoothness_regularisers,
        student_from_actor,
    )
    from madistill.policies.store import load_team, save_team
    from madistill.runtime import make_vec_env, resolve_device, seed_everything
    from madistill.seeds import finetune_episode_seed, finetune_validation_seed
    from madistill.selection import BestPolicy
    from madistill.stages.policies import (
        configured_features,
        distilled_from,
        env_for,
        run_policy_dir,
        teams_for,
    )
    from madistill.teacher import TeacherTrainer

    if not student_path:
        raise MadistillError("no student to fine-tune: pass finetune.policy=<distill run or student policy directory>")
    seed_everything(cfg.seed, cfg.torch_threads)
    device = resolve_device(cfg.device)
    sdir = run_policy_dir(student_path, "student")
    ref = PolicyRef("student", sdir, "student")
    tdir = distilled_from(ref)
    if tdir is None or not tdir.is_dir():
        raise MadistillError(f"{sdir} records no teacher it was distilled from (or it is gone): fine-tune a student "
                             "saved by `madistill distill`, with its teacher in place")
    spec = env_for(cfg, [ref])
    fc = cfg.finetune
    with make_vec_env(cfg.env, spec) as venv:
        student, manifest = load_team(sdir, venv.groups, device=device)
        teacher, _ = load_team(tdir, venv.groups, device=device)
        layouts = feature_layouts(venv.groups, configured_features(cfg, spec), venv.feature_names, cfg.saliency.image_patch)
        budgets = group_budgets(1.0, layouts, cfg.attack.exclude, device, cfg.attack.scale)
        branching = Branching(spec, venv.groups, venv.backend) if fc.attack_objective == "targeted_lookahead" else None
        acting = actor_critic_team(student, teacher)
        director = None
        alternate: Callable[[int, TeamPolicy], None] | None = None
        if fc.attack_objective == "director" and fc.attack_fraction > 0 and fc.eps > 0:
            # ATLA-style alternation: trained against the student before fine-tuning starts, then again every
            # director_every agent-steps against the student as it is then
            director = training_director(spec, venv.groups, fc.steps, cfg.attack, cfg.seed)

            def train_director(step: int, team: TeamPolicy, director=director) -> None:
                tqdm.write(f"training the director against the student of step {step}: "
                           f"{cfg.attack.director_retrain_steps} env steps (attack.director_retrain_steps)")
                director.train_against(team, budgets, fc.eps)
                if director.curve.points:  # its last rollout's return: how much it takes from the student now
                    tb.scalar("finetune/director_return", director.curve.points[-1][1], step)

            alternate = train_director
            train_director(0, acting)
        attack = collection_attack(venv.groups, budgets, fc, cfg.attack, branching, critic=value_critic(teacher),
                                   director=director, sides=teams_for(cfg, venv, [ref]))
        regularisers = smoothness_regularisers(venv.groups, budgets, fc, cfg.seed, device)
        with TeacherTrainer(cfg, venv, spec, device, tb, acting, attack,
                            total_agent_steps=fc.total_agent_steps, learning_rate=fc.learning_rate,
                            episode_seed=finetune_episode_seed(cfg.seed), extra_losses=regularisers) as trainer, \
                ExitStack() as stack:
            if fc.select_every > 0:  # validation plays its own episodes: the trainer's env copies are mid-episode
                best = BestPolicy(stack.enter_context(make_vec_env(cfg.env, spec)), budgets, cfg.attack,
                                  list(fc.select_attacks), fc.eps, fc.select_episodes, fc.select_robust_weight,
                                  finetune_validation_seed(cfg.seed), tb)
                best.offer(0, student)
                trainer.train(run_dir, lambda step, team: best.offer(step, student_from_actor(team, student)),
                              fc.select_every, alternate, fc.director_every)
                best.save(run_dir / "reports" / "selection.json")
                tuned = best.team
                tqdm.write(f"selected the student of step {best.best.step} of {trainer.agent_steps}: validation "
                           f"clean {best.best.clean:.2f}, worst {best.best.worst:.2f} (reports/selection.json)")
            else:
                tuned = student_from_actor(trainer.train(run_dir, alternate=alternate, alternate_every=fc.director_every),
                                           student)
    config = OmegaConf.to_container(cfg, resolve=True)
    saved = manifest.get("config", {})
    config["distill"] = {**saved.get("distill", {}), "teacher": str(tdir)}  # how the student was distilled, and from what
    config["features"] = saved.get("features", {})
    config["finetune"]["policy"] = str(sdir.resolve())
    save_team(run_dir / "policies" / "student", tuned, spec, "student", config=config)
    return tdir


STAGE = Stage(
    name="finetune",
    run=run,
    summary="robust RL fine-tuning (SA-PPO) of a distilled student (finetune.policy=<distill run>)",
    sections=("finetune", "teacher.ppo", "eval"),
    writes="policies/student",
    examples=("madistill finetune finetune.policy=<distill run>",
              "madistill finetune finetune.policy=<distill run> finetune.eps=0.3 finetune.total_agent_steps=1000000"),
    policy_key="finetune.policy",
)
