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
    from madistill.stages.results import print_results, reevaluation, run_metrics
    from madistill.stages.rundir import flat_hparams, open_tb
    from madistill.stages.train import train_teachers

    with open_tb(cfg, run_dir) as tb:
        teacher = trained_teacher(cfg, run_dir) or train_teachers(cfg, run_dir, tb)
        _, history = distill_students(cfg, run_dir, teacher, tb)
        summaries = evaluate_policies(cfg, run_dir, run_dir, tb)
        tb.hparams(flat_hparams(cfg), run_metrics(summaries, history))
    print_results(cfg, run_dir, summaries, run_dir, again=reevaluation(False))
    return summaries


def trained_teacher(cfg: DictConfig, run_dir: Path) -> Path | None:
    """A pipeline resumed in place whose teacher finished training before it stopped (interrupted while distilling
    or evaluating): the teacher saved from its checkpoint, so the pipeline goes on from there; None otherwise.
    A pipeline that finished (its student and report saved) is refused, as ``train`` refuses a finished teacher."""
    from madistill.errors import MadistillError
    from madistill.policies.store import read_manifest

    if not cfg.teacher.resume:
        return None
    checkpoint = Path(cfg.teacher.resume)
    if checkpoint.resolve().parent != run_dir.resolve():  # resumed into another directory: it trains its own teacher
        return None
    teacher = checkpoint.parent / "policies" / "teacher"
    steps = read_manifest(checkpoint).get("training", {}).get("agent_steps", 0)
    if steps < cfg.teacher.total_agent_steps or not (teacher / "manifest.json").is_file():
        return None
    if read_manifest(teacher).get("training", {}).get("agent_steps") != steps:
        return None
    student, report = run_dir / "policies" / "student" / "manifest.json", run_dir / "reports" / "eval.md"
    saved = (teacher / "manifest.json").stat().st_mtime_ns
    # finished: a student and report of this teacher (those of an earlier teacher of the run are older than it)
    if all(p.is_file() and p.stat().st_mtime_ns >= saved for p in (student, report)):
        raise MadistillError(f"the pipeline at {run_dir} finished (its teacher at {steps} agent-steps, its student and "
                             "report saved): raise teacher.total_agent_steps to train the teacher further, or distil "
                             f"it again with `madistill distill distill.teacher={run_dir}`")
    print(f"teacher: trained to {steps} agent-steps before the run stopped ({teacher}): distilling it")
    return teacher


STAGE = Stage(
    name="pipeline",
    run=run,
    summary="the main job: train teachers, distil them into students, evaluate both next to a random team",
    sections=("env", "teacher", "student", "distill", "eval"),
    writes="teachers, students, reports and tb/",
    examples=("madistill pipeline", "madistill pipeline -m seed=0,1,2 +launcher=local"),
    resumes=True,
)
