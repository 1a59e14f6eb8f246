"""The stage registry: every ``madistill <stage>``, with what the command line, its help and Hydra need of it.

Each stage module (``madistill/stages/<name>.py``) declares one :class:`Stage` named ``STAGE``; ``STAGE_MODULES``
lists those modules. The CLI's stage list, ``madistill --help``, ``madistill <stage> --help``, the saved-env and
resume handling and the config sections a stage adds are all read from here. Stage modules import their heavy
dependencies (torch, SB3, matplotlib) inside their functions, so listing the stages stays fast.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from madistill.config import ConfigSection, use_sections

if TYPE_CHECKING:
    from omegaconf import DictConfig

# The stage modules, in the order `madistill --help` lists them: adding a stage adds its module here.
STAGE_MODULES: tuple[str, ...] = (
    "madistill.stages.train",
    "madistill.stages.evaluate",
    "madistill.stages.distill",
    "madistill.stages.finetune",
    "madistill.stages.saliency",
    "madistill.stages.explain",
    "madistill.stages.attack",
    "madistill.stages.cascade",
    "madistill.stages.repair",
    "madistill.stages.purify",
    "madistill.stages.pipeline",
)


@dataclass(frozen=True)
class Stage:
    """One ``madistill <name>``: its run function and what the command line and its help say about it."""

    name: str
    run: Callable[[DictConfig, Path], object]  # the stage: the composed config and its run directory
    summary: str  # its line in `madistill --help`
    sections: tuple[str, ...]  # the config sections it reads, shown setting by setting in `madistill <name> --help`
    writes: str  # what it writes in its run directory
    examples: tuple[str, ...]  # command lines shown in its help
    # The setting naming the saved policies it starts from (``attack.policy``): their env's config file applies
    # unless the command line names an env.
    policy_key: str | None = None
    resumes: bool = False  # it trains teachers: teacher.resume=<run>/checkpoint continues that run in place
    adds: tuple[ConfigSection, ...] = ()  # config sections of its own (schema, default conf/ file) it adds to Config
    # an empty fault.victims faults each agent in turn (the cascade study), not none: a fault named without
    # victims is then no mistake
    faults_each_agent: bool = False


@functools.cache
def stages() -> dict[str, Stage]:
    """The registered stages by name, in ``STAGE_MODULES`` order; their own config sections join the config."""
    found: dict[str, Stage] = {}
    for module in STAGE_MODULES:
        stage = importlib.import_module(module).STAGE
        if stage.name in found:
            raise ValueError(f"{module} registers stage {stage.name!r} again (its first module is listed earlier)")
        found[stage.name] = stage
    use_sections([section for s in found.values() for section in s.adds])
    return found
