"""``madistill train``: teachers for every agent group, trained with SB3 PPO."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from madistill.stages.registry import Stage

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from madistill.tb import TBLogger


def run(cfg: DictConfig, run_dir: Path) -> Path:
    """Train teachers for every group; save them to ``<run>/policies/teacher``."""
    from madistill.stages.rundir import flat_hparams, open_tb, tensorboard_line

    with open_tb(cfg, run_dir) as tb:
        path = train_teachers(cfg, run_dir, tb)
        tb.hparams(flat_hparams(cfg), {"hparam/train_team_return": tb.last("charts/episodic_return")})
    print(f"teachers: {path}\n{tensorboard_line(cfg, run_dir)}\n"
          f"evaluate: madistill evaluate eval.policy={run_dir}\n"
          f"continue: madistill train teacher.resume={run_dir / 'checkpoint'} teacher.total_agent_steps=<more>")
    return path


def train_teachers(cfg: DictConfig, run_dir: Path, tb: TBLogger) -> Path:
    """Train teachers for every group in one vector env; save them to ``<run>/policies/teacher``."""
    from omegaconf import OmegaConf

    from madistill.envs.features import feature_layouts
    from madistill.runtime import env_spec, make_vec_env, resolve_device, seed_everything
    from madistill.stages.policies import configured_features
    from madistill.teacher import TeacherTrainer

    seed_everything(cfg.seed, cfg.torch_threads)
    device = resolve_device(cfg.device)
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv:
        # the teachers' manifest records env.features for every later stage: refuse groups or indices this env
        # lacks now rather than in the first stage that reads them
        feature_layouts(venv.groups, configured_features(cfg, spec), venv.feature_names, cfg.saliency.image_patch)
        with TeacherTrainer(cfg, venv, spec, device, tb) as trainer:
            trainer.train(run_dir)
        trainer.save_checkpoint(run_dir / "checkpoint")  # so a finished run can be continued to a longer budget
        return trainer.save(run_dir / "policies" / "teacher", config=OmegaConf.to_container(cfg, resolve=True))


STAGE = Stage(
    name="train",
    run=run,
    summary="train teachers with SB3 PPO for every agent group",
    sections=("env", "teacher"),
    writes="policies/teacher, checkpoint, tb/",
    examples=("madistill train env=simple_spread_v3 seed=1",
              "madistill train teacher.update_mode=thread   # each PPO update beside the next rollout",
              "madistill train teacher.resume=<run>/checkpoint teacher.total_agent_steps=4000000"),
    resumes=True,
)
