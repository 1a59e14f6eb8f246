"""Shared fixtures: composed Hydra configs with tiny budgets, an in-process CLI runner, Hydra cleanup."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from madistill.cli import compose_config, main

REPO = Path(__file__).resolve().parent.parent


# Tiny budgets for every test that trains or evaluates (a few seconds each on 2 cores).
TINY: list[str] = [
    "logger=quiet",
    "env.num_envs=2",
    "env.num_workers=0",
    "teacher.hidden_sizes=[16]",
    "teacher.ppo.n_steps=25",
    "teacher.ppo.batch_size=100",
    "teacher.ppo.n_epochs=2",
    "student.hidden_sizes=[8]",
    "distill.rounds=2",
    "distill.agent_steps_per_round=200",
    "distill.updates_per_round=20",
    "distill.batch_size=64",
    "eval.episodes=4",
    "eval.n_boot=200",
    "finetune.select_episodes=4",
]


def tiny(*extra: str) -> list[str]:
    """TINY overrides followed by ``extra`` (later overrides win)."""
    return [*TINY, *extra]


def _clear_hydra() -> None:
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


@pytest.fixture
def make_cfg() -> Callable[..., DictConfig]:
    """``make_cfg("env=relay", "teacher.total_agent_steps=400")``: a composed config with TINY budgets."""

    def _make(*overrides: str) -> DictConfig:
        return compose_config(tiny(*overrides))

    return _make


@pytest.fixture(autouse=True)
def _hydra_state():
    """In-process CLI runs leave Hydra's global state set; stages read it (HydraConfig), so reset it."""
    _clear_hydra()
    yield
    _clear_hydra()


def call_cli(args: Sequence[str], mp: pytest.MonkeyPatch) -> int:
    """``madistill.cli.main(args)`` with sys.argv and HYDRA_FULL_ERROR restored afterwards."""
    mp.setattr(sys, "argv", list(sys.argv))
    mp.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        return main(list(args))
    finally:
        _clear_hydra()


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """``rc, out, err = cli("train", "env=relay", ...)``: the CLI in-process, output captured."""

    def _run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = call_cli(args, monkeypatch)
        out, err = capsys.readouterr()
        return rc, out, err

    return _run
