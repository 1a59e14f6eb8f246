"""What every stage keeps in its run directory besides its own outputs: TensorBoard and the HParams tab."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from madistill.tb import TBLogger

# Settings that say where a run's inputs are and how it is filed, logged, launched or spread over processes, not
# what it computes: runs that differ only in these are runs of one recipe (as an override: ``key=``, ``+key=``).
RUN_ONLY = ("seed", "hydra.", "logger", "launcher", "env.num_workers", "env.backend", "torch_threads", "device",
            "teacher.resume", "distill.teacher", "finetune.policy", "eval.policy", "saliency.policy", "saliency.obs",
            "explain.policy", "explain.obs", "attack.policy", "attack.transfer_from", "attack.critic", "cascade.policy",
            "repair.policy", "repair.failures", "purify.teacher")

# Paths and layouts: where things are, not settings to compare runs by.
_NOT_HPARAMS = ("eval.policy", "teacher.resume", "distill.teacher", "saliency.policy", "saliency.obs", "env.features")


def open_tb(cfg: DictConfig, run_dir: Path) -> TBLogger:
    """The run's TensorBoard logger (``<run>/tb``), saving figures to ``<run>/reports`` unless logger.figures is off."""
    return TBLogger(run_dir / "tb", run_dir / "reports" if cfg.logger.figures else None, enabled=cfg.logger.tensorboard)


def tensorboard_line(cfg: DictConfig, run_dir: Path) -> str:
    """The closing line that says how to open the run's TensorBoard, or that the run wrote none."""
    if not cfg.logger.tensorboard:
        return "TensorBoard: none written (logger.tensorboard=false)"
    return f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}   (then open http://localhost:6006)"


def flat_settings(cfg: DictConfig) -> dict[str, Any]:
    """Every scalar leaf of the config (``teacher.ppo.learning_rate`` ...; a list as its text) but paths and
    layouts."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list):
            out[prefix[:-1]] = str(node)
        elif node is not None:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return {k: v for k, v in out.items() if not k.startswith(_NOT_HPARAMS)}


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The settings this run sets, for the HParams tab: those that differ from the schemas' defaults (its env
    file's, its presets' and its command line's) and every one its command line names, so a sweep's varied
    settings are columns for each of its runs (at a default value too), without the couple of hundred settings
    every run leaves at their defaults."""
    from madistill.config import schema_defaults

    defaults = {k: str(v) if isinstance(v, list) else v for k, v in schema_defaults().items()}
    named = set(_command_line_keys())
    return {k: v for k, v in flat_settings(cfg).items() if k in named or k not in defaults or v != defaults[k]}


def _command_line_keys() -> list[str]:
    """The settings this job's command line names (``seed`` of ``seed=1``, a sweep job's own values included)."""
    from madistill.stages.policies import command_line_overrides

    return [o.split("=", 1)[0].lstrip("+~") for o in command_line_overrides() if "=" in o]
