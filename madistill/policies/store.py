"""Policy store: a directory with ``manifest.json`` and one ``<group>.safetensors`` per group; purifiers
(``madistill purify``) likewise, with ``purifier.json``.

Loading reads JSON and safetensors only, so a policy file can never execute code. The env its manifest names is
built from an import path and keyword arguments; ``madistill.envs.factory`` calls only PettingZoo env factories
there (an env class, or a ``parallel_env``/``env``/``raw_env`` function), so a manifest cannot have another
function called with its arguments. Directory writes are
atomic: everything is written into a sibling temp directory that replaces the target in one rename.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from madistill.envs.factory import EnvSpec
from madistill.envs.groups import AgentGroup, space_to_dict
from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies import POLICY_CLASSES
from madistill.policies.base import TeamPolicy
from madistill.policies.purified import Denoiser, Purifier
from madistill.version import __version__

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _arch_of(policy: Any) -> dict[str, Any]:
    return {"class": policy.kind, **policy.arch}


def _aliases(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """The names of ``state`` grouped by the tensor they hold: SB3 keeps a features extractor that actor and
    critic share (a teacher's CNN) under three names, and safetensors stores each tensor once."""
    by_tensor: dict[Any, list[str]] = {}
    for name, v in state.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else name  # empty ones share no data
        by_tensor.setdefault(key, []).append(name)
    return list(by_tensor.values())


def _restore_aliases(policy: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as saved (one name per shared tensor) with every other name ``policy`` has for it filled in."""
    full = dict(state)
    for names in _aliases(policy.state_dict()):
        saved = [n for n in names if n in state]
        if saved:
            full.update({n: state[saved[0]] for n in names})
    return full


def save_team(
    path: str | Path,
    team: TeamPolicy,
    env: EnvSpec,
    role: str,
    config: dict[str, Any] | None = None,
    extra_files: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``team`` to directory ``path`` (replacing it atomically); returns the path.

    ``role`` is a free label such as ``teacher`` or ``student``. ``extra_files`` maps file names to
    callables ``f(path)`` that write side files (e.g. SB3's ``.zip`` for SB3 users). ``training``: how much
    training the policies had (the manifest's ``training``, e.g. ``{"agent_steps": 300, "iterations": 2}``), when it is known.
    """

    def write(tmp: Path) -> None:
        networks = {}
        for g in team.groups:
            policy = team[g.name]
            state = policy.state_dict()
            unique = {names[0]: state[names[0]].detach().cpu().contiguous() for names in _aliases(state)}
            save_file(unique, str(tmp / f"{g.name}.safetensors"))
            networks[g.name] = {
                **_arch_of(policy), "num_parameters": policy.num_parameters, "acting_parameters": policy.acting_parameters
            }
        manifest = _manifest(env, team.normalizers, config, training, role=role,
                             groups=[g.to_dict() for g in team.groups], networks=networks)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)

    return write_dir(path, write)


def _manifest(env: EnvSpec, normalizers: Mapping[str, ObsNormalizer], config: dict[str, Any] | None,
              training: dict[str, Any] | None, **body: Any) -> dict[str, Any]:
    """A saved directory's manifest: the format and version it was written with, when, for which env, ``body``
    (what it holds), the normalisers of the observations it was fitted on, the config and, when known, how much
    training it had."""
    return {
        "format_version": FORMAT_VERSION,
        "madistill_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "env": env.to_dict(),
        **body,
        "normalizers": {g: n.state_dict() for g, n in normalizers.items()},
        "config": config or {},
        **({"training": training} if training else {}),
    }


def write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write`` on a sibling temp directory, then make it ``path`` in one rename (replacing what was
    there); nothing is left behind when ``write`` fails. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        _replace_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_full(e, path)
        if full is not None:
            raise full from e
        raise
    return path


def _disk_full(e: BaseException, path: Path) -> OSError | None:
    """The OSError a full disk or quota would raise, for one that a writer reported as another exception
    (safetensors' ``SafetensorError: ... No space left on device (os error 28)``), so it is reported as one."""
    if isinstance(e, OSError):
        return None
    for code in (errno.ENOSPC, errno.EDQUOT):
        if f"os error {code})" in str(e) or os.strerror(code) in str(e):
            return OSError(code, os.strerror(code), str(path))
    return None


def _replace_dir(src: Path, dst: Path) -> None:
    # A directory cannot be os.replace'd over a non-empty one: move the old one aside first, so at every
    # instant either the old or the new complete policy is at dst.
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def find_policy_dir(path: str | Path, name: str | None = None) -> Path:
    """Accept a policy directory, or a run directory holding ``policies/<name>/``."""
    p = Path(path)
    if not p.exists():
        raise MadistillError(f"no such policy or run directory: {p}; pass the path printed at the end of a run")
    if (p / MANIFEST).is_file():
        return p
    store = p / "policies"
    if store.is_dir():
        # dot-directories are saves in progress (or left by a crash), never policies
        found = sorted(d.name for d in store.iterdir() if (d / MANIFEST).is_file() and not d.name.startswith("."))
        if name is not None:
            if name in found:
                return store / name
            raise MadistillError(f"run {p} has no {name} policy (it holds: {', '.join(found) or 'none'}): pass a run with "
                                 f"one, or the directory of the policy to use, {store}/<name>")
        if len(found) == 1:
            return store / found[0]
        if found:
            raise MadistillError(f"run {p} holds several policies {found}: pass one of them, {p / 'policies'}/<name>")
    raise MadistillError(f"{p} holds no {MANIFEST}: pass a policy directory or a run directory with policies/"
                         + interrupted_hint(p))


# The role of a checkpoint a teacher's training resumes from, and of one a fine-tune leaves when interrupted,
# which does not resume (a fine-tune starts afresh) but holds the policy as it was then.
CHECKPOINT, FINETUNE_CHECKPOINT = "checkpoint", "finetune_checkpoint"


def resumes(ckpt: Path) -> bool:
    """Whether the checkpoint directory ``ckpt`` continues a teacher's training (``teacher.resume``)."""
    try:
        return json.loads((ckpt / MANIFEST).read_text()).get("role") == CHECKPOINT
    except (OSError, ValueError, AttributeError):
        return False


def finish_hint(ckpt: Path) -> str:
    """How to finish the interrupted run whose checkpoint is ``ckpt``."""
    if resumes(ckpt):
        return f"finish the run with `madistill train teacher.resume={ckpt}`"
    return "a fine-tune does not resume: run `madistill finetune` again"


def interrupted_hint(run_dir: Path) -> str:
    """For a run directory without policies but with a training checkpoint (its training was interrupted): how
    to use that checkpoint, or finish the run; else an empty string."""
    ckpt = run_dir / "checkpoint"
    if not (ckpt / MANIFEST).is_file():
        return ""
    return f" (its training was interrupted before saving policies: pass its checkpoint {ckpt} instead, or {finish_hint(ckpt)})"


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a policy directory, checked to be JSON of this format version (one-line errors)."""
    p = Path(path) / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise MadistillError(f"missing {p}: the policy was not saved completely; re-run its stage") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MadistillError(f"corrupt manifest {p} ({e}): re-save the policy or use another run") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise MadistillError(
            f"{p} is not a madistill policy manifest of format {FORMAT_VERSION}; re-save it with this version"
        )
    # the fields every reader indexes into, checked here once rather than failing in each of them
    kinds = {"env": dict, "groups": list, "networks": dict, "normalizers": dict, "config": dict}
    bad = [k for k, kind in kinds.items() if k in manifest and not isinstance(manifest[k], kind)]
    if "env" in manifest and not bad and not isinstance(manifest["env"].get("target"), str):
        bad = ["env.target"]
    if bad:
        raise MadistillError(f"corrupt manifest {p} ({bad[0]} is not a {kinds.get(bad[0], str).__name__}): re-save "
                             "the policy or use another run")
    return manifest


def load_team(
    path: str | Path, groups: list[AgentGroup] | None = None, device: str | torch.device = "cpu",
    manifest: dict[str, Any] | None = None,
) -> tuple[TeamPolicy, dict[str, Any]]:
    """Rebuild a TeamPolicy from a policy (or run) directory; returns (team, manifest).

    With ``groups`` (from the env it will act in), checks that every group's spaces match. ``manifest``: the
    policy directory's manifest where the caller has read it already (``PolicyRef.manifest``).
    """
    pdir = find_policy_dir(path)
    manifest = read_manifest(pdir) if manifest is None else manifest
    try:
        saved = [AgentGroup.from_dict(d) for d in manifest["groups"]]
        if groups is not None:
            check_compatible(saved, groups, manifest["env"].get("name", "?"), pdir)
        policies, normalizers = {}, {}
        for g in saved:
            arch = dict(manifest["networks"][g.name])
            cls = POLICY_CLASSES.get(arch.pop("class"))
            if cls is None:
                raise MadistillError(f"{pdir}: unknown network class in manifest; upgrade madistill")
            arch.pop("num_parameters", None)
            arch.pop("acting_parameters", None)
            policy = cls.from_arch(g, arch)
            state = load_file(str(pdir / f"{g.name}.safetensors"))
            bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise MadistillError(f"{pdir}: {g.name}.safetensors holds NaN/inf weights ({bad[0]}): its training "
                                     "diverged; use another run")
            policy.load_state_dict(_restore_aliases(policy, state))
            policies[g.name] = policy
            normalizers[g.name] = ObsNormalizer.from_state_dict(manifest["normalizers"][g.name])
            if normalizers[g.name].mean.shape != (g.obs_dim,) or normalizers[g.name].var.shape != (g.obs_dim,):
                raise ValueError(f"the normaliser of {g.name!r} has {normalizers[g.name].mean.shape} means and "
                                 f"{normalizers[g.name].var.shape} variances for {g.obs_dim} observation features")
    except (KeyError, TypeError, ValueError) as e:
        raise MadistillError(f"corrupt policy {pdir} ({type(e).__name__}: {e}); re-save it or use another run") from e
    except (SafetensorError, FileNotFoundError, RuntimeError) as e:
        raise MadistillError(f"unreadable weights in {pdir} ({_brief(e)}); re-save the policy or use another run") from e
    return TeamPolicy(saved, policies, normalizers).to(device), manifest


def _brief(e: Exception) -> str:
    """An error's message on one line (torch's list of mismatched weights spans one line per weight): its first
    three lines, and how many more there are."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")


def check_compatible(saved: list[AgentGroup], env_groups: list[AgentGroup], saved_env: str, where: Path) -> None:
    """Raise a MadistillError naming the fix when a saved team cannot act in an env."""
    by_agent = {a: g for g in env_groups for a in g.agents}
    for g in saved:
        for agent in g.agents:
            eg = by_agent.get(agent)
            if eg is None:
                raise MadistillError(
                    f"policy {where} (env {saved_env}) controls agent {agent!r}, which this env lacks: "
                    f"use it with env={saved_env}"
                )
            for what, mine, theirs in (("observation", g.observation_space, eg.observation_space),
                                       ("action", g.action_space, eg.action_space)):
                if mine != theirs:
                    raise MadistillError(
                        f"policy {where} was saved for env {saved_env} and its {what} space for {agent!r} differs from "
                        f"this env's ({space_to_dict(mine)} vs {space_to_dict(theirs)}): use it with env={saved_env} "
                        "and the same env kwargs"
                    )
    missing = set(by_agent) - {a for g in saved for a in g.agents}
    if missing:
        raise MadistillError(f"policy {where} has no policy for agents {sorted(missing)}; use a policy for this env")
    partition = {g.name: list(g.agents) for g in saved}
    if partition != {g.name: list(g.agents) for g in env_groups}:
        mode = "per_agent" if all(len(g.agents) == 1 and g.name == g.agents[0] for g in saved) else "auto"
        raise MadistillError(f"policy {where} groups its agents as {partition}, unlike this env's env.grouping: "
                             f"pass env.grouping={mode} as when it was trained")


PURIFIER_MANIFEST = "purifier.json"


def save_purifier(path: str | Path, purifier: Purifier, env: EnvSpec, config: dict[str, Any] | None = None,
                  training: dict[str, Any] | None = None) -> Path:
    """Write ``purifier`` to directory ``path`` (atomically): ``purifier.json`` (each group's feature count and
    denoiser architecture, the normalisers of the data it learnt, the config) and ``<group>.safetensors``."""

    def write(tmp: Path) -> None:
        for name, den in purifier.denoisers.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in den.state_dict().items()},
                      str(tmp / f"{name}.safetensors"))
        manifest = _manifest(env, purifier.normalizers, config, training, groups={
            name: {"obs_dim": den.obs_dim, "arch": den.arch} for name, den in purifier.denoisers.items()})
        (tmp / PURIFIER_MANIFEST).write_text(json.dumps(manifest, indent=2))

    return write_dir(path, write)


def load_purifier(path: str | Path, device: str | torch.device = "cpu") -> Purifier:
    """Rebuild a purifier from its directory, or from a ``madistill purify`` run holding ``purifier/``, reading
    JSON and safetensors only."""
    p = Path(path)
    pdir = p / "purifier" if (p / "purifier" / PURIFIER_MANIFEST).is_file() else p
    fix = "pass a purifier directory or a madistill purify run (purify.purifier=<run>)"
    try:
        manifest = json.loads((pdir / PURIFIER_MANIFEST).read_text())
    except FileNotFoundError as e:
        raise MadistillError(f"{p} holds no {PURIFIER_MANIFEST}: {fix}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MadistillError(f"corrupt purifier manifest {pdir / PURIFIER_MANIFEST} ({e}): re-run madistill purify") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise MadistillError(f"{pdir / PURIFIER_MANIFEST} is not a purifier of format {FORMAT_VERSION}: re-run madistill purify")
    try:
        denoisers = {}
        for name, spec in manifest["groups"].items():
            den = Denoiser(spec["obs_dim"], spec["arch"])
            den.load_state_dict(load_file(str(pdir / f"{name}.safetensors")))
            denoisers[name] = den
        normalizers = {g: ObsNormalizer.from_state_dict(d) for g, d in manifest["normalizers"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise MadistillError(f"corrupt purifier {pdir} ({type(e).__name__}: {e}): re-run madistill purify") from e
    except (SafetensorError, FileNotFoundError, RuntimeError) as e:
        raise MadistillError(f"unreadable purifier weights in {pdir} ({_brief(e)}): re-run madistill purify") from e
    return Purifier(denoisers, normalizers, str(pdir)).to(device)
