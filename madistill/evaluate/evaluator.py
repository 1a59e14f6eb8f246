"""Evaluate saved policies: seeded episodes through the shared rollout loop, statistics, reports, figures."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from madistill.envs.episodes import EpisodeRecord
from madistill.envs.factory import EnvSpec
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies.base import TeamPolicy
from madistill.policies.store import MANIFEST, interrupted_hint, read_manifest
from madistill.policies.uniform import UniformPolicy
from madistill.rollout import Rollout
from madistill.transforms import ActionTransform, ObsTransform

# The most copies a batched run plays at once: the port's env-steps/s levels off by 4,096 copies
# (docs/batched_mpe.md, Speed) while its memory keeps growing with them.
BATCHED_COPIES = 4096


def episode_copies(venv: MultiAgentVecEnv, episodes: int, own_streams: bool,
                   transforms: Sequence[ObsTransform | ActionTransform] = ()) -> int:
    """How many env copies play ``episodes`` episodes of ``venv``'s env: on the batched backend, where one set
    of array operations steps any number of copies, all of them at once (up to ``BATCHED_COPIES``, and never
    fewer than ``venv.num_envs``) when no draw depends on the copy count: every action greedy or drawn from
    its episode's own stream (``own_streams``), and no transform drawing from the stream the copies share.
    Otherwise, and on the PettingZoo backend, ``venv.num_envs``."""
    if (venv.backend != "batched" or venv.seed_period is not None or not own_streams
            or any(t.shared_stream for t in transforms)):
        return venv.num_envs
    return max(venv.num_envs, min(episodes, BATCHED_COPIES))


def run_episodes(
    venv: MultiAgentVecEnv,
    team: TeamPolicy,
    episodes: int,
    seed: int,
    deterministic: bool = True,
    transforms: Sequence[ObsTransform | ActionTransform] = (),
    progress: str | None = None,
    episode_streams: bool = False,
) -> list[EpisodeRecord]:
    """Play episodes with seeds ``seed .. seed+episodes-1``; same inputs give the same records.
    ``episode_streams``: sampled actions come from one stream per episode, so they do not depend on
    ``venv.num_envs`` either (see ``Rollout``). The copies that play them: ``episode_copies``."""
    copies = episode_copies(venv, episodes, deterministic or episode_streams, transforms)
    if copies != venv.num_envs:
        with venv.with_copies(copies) as wide:
            return run_episodes(wide, team, episodes, seed, deterministic, transforms, progress, episode_streams)
    rollout = Rollout(venv, team, transforms=transforms, deterministic=deterministic, seed=seed,
                      episode_streams=episode_streams)
    return rollout.run(episodes=episodes, progress=progress)


def uniform_team(venv: MultiAgentVecEnv, device: torch.device | str = "cpu") -> TeamPolicy:
    """A uniform-random team for the env: the "random policy" reference of every report."""
    return TeamPolicy(
        venv.groups,
        {g.name: UniformPolicy(g) for g in venv.groups},
        {g.name: ObsNormalizer(g.obs_dim, enabled=False) for g in venv.groups},
    ).to(device)


@dataclass
class PolicyRef:
    """A saved policy found on disk: ``name`` (its directory name) inside run ``run``."""

    name: str
    path: Path
    run: str

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """The policy's manifest, read once: a stage consults it for the env, the teams, the teacher and the
        settings of every policy it studies, and pairs every policy with every other."""
        return read_manifest(self.path)


def discover_policies(path: str | Path, names: Sequence[str] = ()) -> list[PolicyRef]:
    """All policy directories under ``path``: a policy dir, a run dir (``policies/*``) or a sweep dir
    (``*/policies/*``, one run per sweep job). Training checkpoints are skipped."""
    root = Path(path)
    if not root.exists():
        raise MadistillError(f"no such policy or run directory: {root}; pass the path printed at the end of a run")
    if (root / MANIFEST).is_file():
        found = [PolicyRef(root.name, root, run_dir_of(root).name)]
    else:
        found = [
            PolicyRef(m.parent.name, m.parent, _run_name(m.parent.parent.parent, root))
            for m in sorted(_manifests(root, "policies"), key=_policy_order)
            if not m.parent.name.startswith(".")  # a save in progress, or one a crash left behind
        ]
    if names:
        unknown = set(names) - {f.name for f in found}
        if unknown:
            raise MadistillError(f"no policies named {sorted(unknown)} under {root}; found {sorted({f.name for f in found})}")
        found = [f for f in found if f.name in names]
    if not found:
        raise MadistillError(f"{root} holds no saved policy ({MANIFEST}): pass a run or policy directory"
                             + interrupted_hint(root))
    return found


def unfinished_runs(path: str | Path) -> list[Path]:
    """The run directories at or under ``path`` whose training was interrupted before they saved policies (a
    checkpoint, no ``policies/``): runs :func:`discover_policies` finds nothing in."""
    root = Path(path)
    if (root / MANIFEST).is_file():
        return []
    return sorted(c.parent.parent for c in _manifests(root, "checkpoint", nested=False)
                  if not (c.parent.parent / "policies").is_dir())


def _manifests(root: Path, folder: str, nested: bool = True) -> list[Path]:
    """The manifests at ``<folder>/<name>/`` (``nested``) or ``<folder>/`` under ``root``, through symbolic links
    too (a directory of links to the runs to compare), in name order. A link back to a directory it sits in is not
    followed."""
    found: list[Path] = []

    def walk(here: Path, ancestors: frozenset[str]) -> None:
        real = os.path.realpath(here)
        if real in ancestors:
            return
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError:  # unreadable, or a dangling link
            return
        for entry in entries:
            if entry.is_dir():
                walk(Path(entry.path), ancestors | {real})
            elif entry.name == MANIFEST and (here.parent.name if nested else here.name) == folder:
                found.append(here / MANIFEST)

    walk(root, frozenset())
    return found


def run_dir_of(policy_dir: Path) -> Path:
    """The run directory a saved policy's directory sits in (``<run>/policies/<name>``), or the policy directory
    itself when it stands alone."""
    return policy_dir.parent.parent if policy_dir.parent.name == "policies" else policy_dir


def teacher_of(label: str, labels: Sequence[str]) -> str | None:
    """Of the report labels ``labels`` (``name``, or ``name@run`` from several runs), the teacher ``label`` was
    studied beside: its own run's (``teacher@<run>``), else ``teacher``, else the only teacher (a teacher's run
    beside its students' runs); None without one."""
    run = label.split("@", 1)[1] if "@" in label else None
    found = [c for c in (f"teacher@{run}" if run else None, "teacher") if c in labels]
    teachers = [t for t in labels if t.split("@", 1)[0] == "teacher"]
    return found[0] if found else teachers[0] if len(teachers) == 1 else None


def _run_name(run_dir: Path, root: Path) -> str:
    """A run's name in the reports: its path under the directory searched, or that directory's own name (not
    '.', which every run's reports and marl-eval files would share)."""
    return root.resolve().name if run_dir == root else str(run_dir.relative_to(root))


def _policy_order(manifest: Path) -> tuple[str, int, str]:
    """Runs in path order; within a run the teacher first, then its student, then the rest by name."""
    name = manifest.parent.name
    return str(manifest.parent.parent.parent), {"teacher": 0, "student": 1}.get(name, 2), name


def saved_env(refs: Sequence[PolicyRef]) -> EnvSpec:
    """The env the policies were saved for (they must agree)."""
    specs = {json.dumps(r.manifest["env"], sort_keys=True) for r in refs}
    if len(specs) > 1:
        raise MadistillError("the policies were saved for different envs: evaluate one env's runs at a time")
    return EnvSpec.from_dict(json.loads(specs.pop()))


def check_video_writer(ec: Any) -> None:
    """Refuse ``eval.video`` in a format no installed writer handles before any episode is played: MP4 needs
    imageio's ffmpeg plugin (the ``video`` extra)."""
    import importlib.util

    if ec.video and ec.video_format == "mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise MadistillError("eval.video_format=mp4 needs imageio's ffmpeg plugin: pip install 'madistill[video]', "
                             "or use eval.video_format=gif")


def record_video(spec: EnvSpec, team: TeamPolicy, path: Path, seed: int, deterministic: bool, fmt: str,
                 grouping: str = "auto") -> Path:
    """Render one episode (seed ``seed``) from the env's ``rgb_array`` render into a GIF or MP4."""
    import imageio.v3 as iio

    with MultiAgentVecEnv(spec, 1, num_workers=0, grouping=grouping, render_mode="rgb_array") as venv:
        rollout = Rollout(venv, team, deterministic=deterministic, seed=seed)
        frames = [venv.render(0)]

        def grab(tr: Any) -> None:
            if not tr.result.episodes:  # after the last step the copy has already reset
                frames.append(venv.render(0))

        rollout.run(episodes=1, on_step=grab)
    frames = [np.asarray(f) for f in frames if f is not None]
    if not frames:
        raise MadistillError(f"env {spec.id!r} rendered no rgb_array frames: set eval.video=false for this env")
    out = path.with_suffix("." + fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "gif":
            iio.imwrite(out, np.stack(frames), duration=100, loop=0)
        else:
            iio.imwrite(out, np.stack(frames), fps=10)
    except Exception as e:  # missing video backend: say which extra to install
        raise MadistillError(f"could not write {out} ({e}): use eval.video_format=gif or pip install 'madistill[video]'") from e
    return out
