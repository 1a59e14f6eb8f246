"""``madistill pipeline``: the main job, train, distil and evaluate in one run directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from madistill.stages.registry import Stage

if TYPE_CHECKING:
    from omegaconf import DictConfig


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train teachers, distil them into students, evaluate both next to a random team."""
    from madistill.stages.distill import distill_students
    from madistill.stages.evaluate import evaluate_policies
    from madistill.stages.results import print_results, run_metrics
    from madistill.stages.rundir import flat_hparams, open_tb
    from madistill.stages.train import train_teachers

    with open_tb(cfg, run_dir) as tb:
        teacher = train_teachers(cfg, run_dir, tb)
        _, history = distill_students(cfg, run_dir, teacher, tb)
        summaries = evaluate_policies(cfg, run_dir, run_dir, tb)
        tb.hparams(flat_hparams(cfg), run_metrics(summaries, history))
    print_results(run_dir, summaries, run_dir)
    return summaries


STAGE = Stage(
    name="pipeline",
    run=run,
    summary="the main job: train teachers, distil them into students, evaluate both next to a random team",
    sections=("env", "teacher", "student", "distill", "eval"),
    writes="teachers, students, reports and tb/",
    examples=("madistill pipeline", "madistill pipeline -m seed=0,1,2 +launcher=local"),
    resumes=True,
)
