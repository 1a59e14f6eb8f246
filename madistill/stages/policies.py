"""The saved policies a stage studies: finding them, pairing a student with its teacher, and the env and teams
they act in."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from madistill.config import changes_env
from madistill.envs.factory import EnvSpec
from madistill.envs.features import FeatureLayout, feature_layouts
from madistill.envs.groups import AgentGroup
from madistill.envs.teams import Teams
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.evaluate.evaluator import PolicyRef, discover_policies, run_dir_of, saved_env, unfinished_runs
from madistill.policies.base import TeamPolicy
from madistill.policies.purified import Purifier, purified_team
from madistill.policies.store import MANIFEST, find_policy_dir, load_purifier, load_team
from madistill.runtime import env_spec, env_teams, resolve_device, seed_everything


def command_line_overrides(hydra_settings: Sequence[str] = ()) -> list[str]:
    """The command line's overrides (``key=value``), after those of Hydra's own settings named in
    ``hydra_settings`` (``hydra.searchpath``), which Hydra keeps apart."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:  # not running under Hydra (tests, library use)
        return []
    return [*(o for o in hc.overrides.hydra if o.split("=", 1)[0] in hydra_settings), *hc.overrides.task]


def env_for(cfg: DictConfig, refs: list[PolicyRef]) -> EnvSpec:
    """The env the policies were saved for, unless the command line picks another (``changes_env``; the CLI
    itself adds ``env=<saved id>`` to pick the saved env's config file)."""
    saved = saved_env(refs)
    return env_spec(cfg.env) if changes_env(command_line_overrides(), saved.id) else saved


def teams_for(cfg: DictConfig, venv: MultiAgentVecEnv, refs: Sequence[PolicyRef]) -> Teams:
    """The teams of the env the policies act in: ``env.teams`` (command line or env file), else, in the env
    they were saved for, the teams they were trained with (a custom env's ``+env.teams`` lives only in their
    manifests), else inferred from the agent names."""
    saved = None
    if not changes_env(command_line_overrides(), saved_env(refs).id):
        saved = next((t for r in refs if (t := r.manifest.get("config", {}).get("env", {}).get("teams"))), None)
    return env_teams(cfg.env, venv, saved)


def configured_features(cfg: DictConfig, spec: EnvSpec) -> dict:
    """``env.features`` when the config's env is the one the teacher acts in (feature groups are per env)."""
    if cfg.env.name != spec.name:
        return {}
    return OmegaConf.to_container(cfg.env.features, resolve=True) or {}


def studied_policies(
    cfg: DictConfig, path: str | Path | Sequence[str | Path] | None, missing: str, add_teachers: bool = True
) -> tuple[torch.device, list[PolicyRef], EnvSpec]:
    """Seeded set-up shared by the stages that study saved policies: the device, the policies under ``path``
    (one directory or a list; with a student's teacher added unless ``add_teachers`` is off) and the env they
    act in. ``missing``: the error when no path is given."""
    if not path:
        raise MadistillError(missing)
    seed_everything(cfg.seed, cfg.torch_threads)
    device = resolve_device(cfg.device)
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    found = [discover_policies(p, list(cfg.eval.names)) for p in paths]
    for p, refs in zip(paths, found):
        _note_missing(refs, unfinished_runs(p))
    refs = _distinct_runs([ref for refs in found for ref in refs])
    refs = with_teachers(refs) if add_teachers else refs
    return device, refs, env_for(cfg, refs)


def _note_missing(refs: list[PolicyRef], unfinished: list[Path]) -> None:
    """Say on stderr which runs of a listed directory (``refs``: its policies) the study leaves out: those
    interrupted before they saved policies, and runs without a policy its other runs have (a pipeline stopped
    before its student)."""
    from madistill.policies.store import finish_hint

    for run in unfinished:
        print(f"madistill: note: skipped {run}: its training was interrupted before it saved policies "
              f"({finish_hint(run / 'checkpoint')})", file=sys.stderr)
    runs = {r.run for r in refs}
    for name in sorted({r.name for r in refs}):
        lacking = sorted(runs - {r.run for r in refs if r.name == name})
        if lacking and len(runs) > 1:
            print(f"madistill: note: {name} pools {len(runs) - len(lacking)} of {len(runs)} runs: "
                  f"{', '.join(lacking)} saved no {name}", file=sys.stderr)


def _distinct_runs(refs: list[PolicyRef]) -> list[PolicyRef]:
    """``refs`` with a run named by its directory's whole path where several run directories (of several listed
    paths) share a name: each path names its runs relative to itself."""
    dirs: dict[str, set[Path]] = {}
    for ref in refs:
        dirs.setdefault(ref.run, set()).add(run_dir_of(ref.path).resolve())
    return [replace(ref, run=str(run_dir_of(ref.path))) if len(dirs[ref.run]) > 1 else ref for ref in refs]


def policy_labels(refs: Sequence[PolicyRef]) -> list[str]:
    """The reports' label of each policy: its name, or ``name@run`` when the policies come from several runs (a
    sweep's, or a student's and its teacher's), which pairs each policy with its own run's teacher."""
    several = len({r.run for r in refs}) > 1
    return [f"{r.name}@{r.run}" if several else r.name for r in refs]


def labelled_teams(
    cfg: DictConfig, spec: EnvSpec, venv: MultiAgentVecEnv, refs: Sequence[PolicyRef], device: torch.device
) -> tuple[list[str], dict[str, TeamPolicy], dict[str, FeatureLayout]]:
    """The studied policies loaded, labelled by :func:`policy_labels`, and the
    feature layouts their maps are grouped by."""
    labels = policy_labels(refs)
    purifier = configured_purifier(cfg, device)
    teams = {label: load_policy(ref, venv.groups, device, purifier, cfg.seed) for label, ref in zip(labels, refs)}
    layouts = feature_layouts(venv.groups, configured_features(cfg, spec), venv.feature_names, cfg.saliency.image_patch)
    return labels, teams, layouts


def load_policy(ref: PolicyRef, groups: list[AgentGroup], device: torch.device, purifier: Purifier | None = None,
                seed: int = 0) -> TeamPolicy:
    """The saved policy ``ref`` as a team acting in an env of ``groups``, from the manifest the ref has read;
    with ``purifier`` (:func:`configured_purifier`) in front of it (its noise seeded with ``seed``)."""
    team = load_team(ref.path, groups, device=device, manifest=ref.manifest)[0]
    return team if purifier is None else purified_team(team, purifier, seed)


def configured_purifier(cfg: DictConfig, device: torch.device) -> Purifier | None:
    """The purifier ``purify.purifier`` names, which every stage puts in front of the policies it loads (None
    when unset)."""
    return load_purifier(cfg.purify.purifier, device) if cfg.purify.purifier else None


def _attacks_through(cfg: DictConfig, attacks: bool) -> bool:
    """Whether white-box attacks craft through the purifier in this stage: the attack stage's (``attacks``), or
    the configured fault's when it is an attack (``fault=attack``)."""
    return attacks or bool(cfg.fault.victims and cfg.fault.name == "attack")


def purifier_meta(cfg: DictConfig, attacks: bool = False) -> dict | None:
    """The purifier in front of the policies, for a report's meta, with what white-box attacks differentiate
    where the stage attacks (``attacks``: the attack stage; or an attack fault); None without one."""
    pc = cfg.purify
    if not pc.purifier:
        return None
    crafting = {"gradient": str(pc.gradient), "eot_samples": pc.eot_samples} if _attacks_through(cfg, attacks) else {}
    return {"path": str(pc.purifier), **crafting}


def purifier_line(cfg: DictConfig, attacks: bool = False) -> str:
    """The reports' line on the purifier, with what the white-box attacks (``attacks``: the attack stage's) or
    the attack fault differentiate ("" without one)."""
    pc = cfg.purify
    if not pc.purifier:
        return ""
    if not _attacks_through(cfg, attacks):
        return f"Purifier {pc.purifier} in front of every policy."
    view = {"through": "through it (adaptive)", "bpda": "its forward pass with identity gradients (BPDA)",
            "ignore": "the undefended policies (attacks unaware of it)"}[str(pc.gradient)]
    eot = f", averaged over {pc.eot_samples} draws of its noise (EOT)" if pc.eot_samples > 1 else ""
    if attacks:
        return (f"Purifier {pc.purifier} in front of every policy; the white-box attacks differentiate {view}{eot}; "
                "the gradient-masking probe attacks through it.")
    return f"Purifier {pc.purifier} in front of every policy; the attack fault differentiates {view}{eot}."


def paired_policy(ref: PolicyRef, role: str, refs: Sequence[PolicyRef]) -> int | None:
    """Index in ``refs`` of the ``role`` policy that belongs with ``ref`` (a transfer surrogate, a critic): the
    one in the same run, else the teacher a student was distilled from (or that teacher's student), else the
    first of that role. In a sweep, each run's student is thus paired with its own teacher."""
    found = [i for i, r in enumerate(refs) if r.name == role and r.path != ref.path]
    same_run = [i for i in found if refs[i].run == ref.run]
    if role == "teacher":
        linked = [i for i in found if refs[i].path.resolve() == distilled_from(ref)]
    else:
        linked = [i for i in found if distilled_from(refs[i]) == ref.path.resolve()]
    return (same_run or linked or found or [None])[0]


def distilled_from(ref: PolicyRef) -> Path | None:
    """The teacher directory a student's manifest records (None for other policies)."""
    manifest = ref.manifest
    path = manifest.get("config", {}).get("distill", {}).get("teacher")
    return Path(path).resolve() if manifest.get("role") == "student" and path else None


def with_teachers(refs: list[PolicyRef]) -> list[PolicyRef]:
    """Add the teacher a student was distilled from (recorded in its manifest) when it is not listed."""
    if any(r.name == "teacher" for r in refs):
        return refs
    for r in refs:
        path = distilled_from(r)
        if path is not None and path.is_dir():
            # named by its run: the listed run it sits in (a student's own), else its run directory's name, else
            # that directory's path where a listed run has that name
            run_dir = run_dir_of(path)
            listed = next((x.run for x in refs if run_dir_of(x.path).resolve() == run_dir), None)
            run = listed or (str(run_dir) if run_dir.name in {x.run for x in refs} else run_dir.name)
            return [PolicyRef("teacher", path, run), *refs]
    return refs


def teacher_dir(path: str | Path) -> Path:
    """A teacher policy dir, or the ``teacher`` policy of a run dir."""
    return run_policy_dir(path, "teacher")


def run_policy_dir(path: str | Path, name: str) -> Path:
    """The policy dir ``path``, or the ``name`` policy of a run dir (refused in one line for a run without one:
    another policy of it is used only when named by its own directory)."""
    p = Path(path)
    return find_policy_dir(p, None if (p / MANIFEST).is_file() else name)
