"""The configured fault (``fault.*``) as the transforms every stage that rolls out applies, and how reports
name it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig


def configured_faults(cfg: DictConfig, venv: Any, spec: Any, device: Any, teams: Any) -> list:
    """The fault the config names, as a one-element transform list for a stage's rollouts (``evaluate``), or no
    transform where ``fault.victims`` is empty (the default): ``madistill evaluate fault=stuck fault.victims=[a]``.
    ``teams``: the env's teams (``stages.policies.teams_for``)."""
    from madistill.cascade.faults import make_fault
    from madistill.envs.features import feature_layouts
    from madistill.stages.policies import configured_features

    if not cfg.fault.victims:
        return []
    layouts = feature_layouts(venv.groups, configured_features(cfg, spec), venv.feature_names, cfg.saliency.image_patch)
    return [make_fault(cfg.fault, fault_env(cfg, venv.groups, layouts, spec, device, teams))]


def check_fault_victims(cfg: DictConfig, overrides: list[str]) -> None:
    """One line, before a stage starts, where the command line's ``overrides`` name a fault (``fault=...``,
    ``fault.<setting>=...``) but the config names no victims: the stage would play no fault, silently. (The
    cascade stage, which studies each agent in turn then, does not ask.)"""
    from madistill.errors import MadistillError

    named = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] == "fault"]
    if named and not cfg.fault.victims:
        raise MadistillError(f"{' '.join(named)} names no victims, so no fault would be played: add "
                             "\"fault.victims=[<agent ids>]\"")


def fault_env(cfg: DictConfig, groups: list, layouts: dict, spec: Any, device: Any, teams: Any = None) -> Any:
    """The ``FaultEnv`` the configured faults are built with: the env, its ``teams`` (whose return the worst
    action lowers), the attack settings of attack faults, and the view of a purified team they craft on
    (``purify.gradient``, ``purify.eot_samples``), as the attack stage's."""
    from madistill.cascade.faults import FaultEnv
    from madistill.policies.purified import attack_view

    pc = cfg.purify

    def crafted_on(team: Any) -> Any:
        return attack_view(team, str(pc.gradient), int(pc.eot_samples), int(cfg.seed) + 1)

    return FaultEnv(groups, layouts, cfg.attack, device, spec, cfg.env.backend, crafted_on if pc.purifier else None,
                    teams)


def fault_label(cfg: DictConfig) -> str:
    """The configured fault's label in reports: ``<fault>@<victim>+<victim>`` (as the cascade study's)."""
    return f"{cfg.fault.name}@{'+'.join(cfg.fault.victims)}"


def fault_meta(cfg: DictConfig) -> dict | None:
    """The configured fault's settings, for a report's meta (None without one)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.fault, resolve=True) if cfg.fault.victims else None  # type: ignore[return-value]


def played_under(cfg: DictConfig, attacks: bool = False) -> list[str]:
    """The lines naming what a stage's episodes played under, for its report and terminal: the fault and the
    purifier (with what the white-box attacks differentiate: ``attacks``, the attack stage), those that are set."""
    from madistill.stages.policies import purifier_line

    return [n for n in (fault_line(cfg), purifier_line(cfg, attacks)) if n]


def fault_line(cfg: DictConfig) -> str:
    """One line saying which fault a stage's rollouts played under (empty without one)."""
    fc = cfg.fault
    if not fc.victims:
        return ""
    onset = fc.onset if fc.onset_max is None else f"{fc.onset}..{fc.onset_max}"
    length = "to the episode's end" if fc.duration is None else f"for {fc.duration} step(s)"
    return (f"Under fault {fc.name!r} on {', '.join(fc.victims)} from step {onset} {length}"
            + (f" at rate {fc.rate:g}" if fc.rate < 1 else "") + " (docs/cascade.md).")
