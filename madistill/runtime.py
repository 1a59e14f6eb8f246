"""Turning config into live objects: device, threads, seeds, env spec and vector env."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from madistill.envs.factory import EnvSpec
from madistill.envs.teams import Teams, resolve_teams
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise MadistillError(f"unknown device {name!r}: use device=cpu, device=cuda or device=auto") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MadistillError(f"device={name} was asked for but torch sees no CUDA GPU: use device=cpu or device=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MadistillError(f"device={name}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if device.type not in ("cpu", "cuda"):  # a type torch knows but madistill does not use (mps, xpu, meta, ...)
        raise MadistillError(f"device={name} is not supported: use device=cpu, device=cuda or device=auto")
    return device


def seed_everything(seed: int, torch_threads: int = 0) -> None:
    """Seed Python, NumPy and torch; ``torch_threads`` > 0 also fixes torch's CPU thread count."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)


def env_spec(env_cfg: DictConfig) -> EnvSpec:
    """The env spec (import path, kwargs, name) of an ``env`` config node."""
    kwargs = OmegaConf.to_container(env_cfg.kwargs, resolve=True) if env_cfg.kwargs is not None else {}
    return EnvSpec(target=env_cfg.target, kwargs=dict(kwargs), name=env_cfg.name)


def make_vec_env(env_cfg: DictConfig, spec: EnvSpec | None = None, **overrides: object) -> MultiAgentVecEnv:
    """The configured vector env (``overrides`` replace config fields, e.g. ``num_envs=1``)."""
    opts = {
        "num_envs": env_cfg.num_envs,
        "num_workers": env_cfg.num_workers,
        "grouping": env_cfg.grouping,
        "nan_policy": env_cfg.nan_policy,
        "backend": env_cfg.backend,
    }
    opts.update(overrides)
    return MultiAgentVecEnv(spec or env_spec(env_cfg), **opts)  # type: ignore[arg-type]


def env_teams(env_cfg: DictConfig, venv: MultiAgentVecEnv, saved: Mapping[str, Sequence[str]] | None = None) -> Teams:
    """The teams of the env ``venv`` steps: ``env.teams`` when set, else ``saved`` (the teams saved policies
    were trained with), else inferred from its agent names."""
    spec = OmegaConf.to_container(env_cfg.teams, resolve=True) if env_cfg.get("teams") else saved
    return resolve_teams(spec, venv.possible_agents)  # type: ignore[arg-type]
