"""Online alerts inside the stages that roll out (``alerts.enabled``): a monitor per policy calibrated on clean
episodes, watching the stage's episodes clean and under each configured fault; ``reports/alerts.json``, a report
section and TensorBoard scalars (docs/cascade.md, Online alerts)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from madistill.cascade.faults import Fault
    from madistill.cascade.paired import MakeVenv
    from madistill.envs.vector import MultiAgentVecEnv
    from madistill.policies.base import TeamPolicy
    from madistill.tb import TBLogger


def watch_policy(
    cfg: DictConfig,
    venv: MultiAgentVecEnv,
    make_venv: MakeVenv,
    team: TeamPolicy,
    faults: Sequence[tuple[str, Fault]],
    episodes: int,
    seed: int,
    deterministic: bool,
    threshold: float,
) -> dict[str, Any]:
    """The alerts section of one policy: thresholds calibrated as ``cfg.alerts`` says, the alerts and false alarms of
    clean episodes ``seed .. seed+episodes-1``, and per labelled fault the alerts in the same episodes played under
    it with their detection rate and delay (``watch_fault``; another agent fails when its TV from its clean twin
    exceeds ``threshold`` or as ``cascade.return_loss`` says). ``faults`` must be fresh: the paired run arms each on its own block."""
    from madistill.cascade.alerts import (
        AlertMonitor,
        clean_alarms,
        configured_monitor,
        events_json,
        monitor_episodes,
        watch_fault,
    )

    monitor = configured_monitor(cfg.alerts, venv, team, deterministic=deterministic)
    clean = AlertMonitor(team, monitor.kinds, monitor.thresholds, monitor.reference)
    monitor_episodes(venv, clean, episodes, seed, deterministic=deterministic)
    seeds = list(range(seed, seed + episodes))
    n_boot = int(cfg.cascade.n_boot)
    loss = None if cfg.cascade.return_loss is None else float(cfg.cascade.return_loss)
    section: dict[str, Any] = {
        "thresholds": monitor.thresholds_dict(),
        "clean": {"false_alarms": clean_alarms(clean.events, seeds, n_boot), "events": events_json(clean.events)},
        "faults": {},
    }
    for label, fault in faults:
        d = watch_fault(make_venv, monitor, fault, episodes, seed, threshold, deterministic, loss,
                        max_copies=int(cfg.cascade.max_copies))
        section["faults"][label] = {"victims": list(fault.scope.victims), **d.summary(n_boot),
                                    "events": events_json(d.events)}
    return section


def check_alerts(cfg: DictConfig, agents: int) -> None:
    """Refuse, before anything runs, too few calibration episodes for ``alerts.false_alarm_rate`` split over
    ``agents`` agents and the scores, and an ``alerts.reference`` that is no saved policy (one line naming the
    settings)."""
    import numpy as np

    from madistill.cascade.alerts import conformal_threshold
    from madistill.policies.store import find_policy_dir, read_manifest

    ac = cfg.alerts
    conformal_threshold(np.zeros((int(ac.calibration_episodes), 1)), float(ac.false_alarm_rate) / (agents * len(ac.scores)))
    if ac.reference is not None:
        read_manifest(find_policy_dir(ac.reference))


def log_alerts(tb: TBLogger, stage: str, sections: dict[str, dict[str, Any]]) -> None:
    """Each policy's alerts in TensorBoard: per event a scalar ``<stage>/alerts/<policy>/<agent>/<kind>`` (the score,
    at the episode step) and a line of text under ``<stage>/alerts/<policy>/events/<clean or fault>``; ``.../false_alarms`` (alerts
    per clean episode) and, per fault, ``.../<fault>/detected`` and ``.../<fault>/delay``."""
    for policy, s in sections.items():
        tb.scalar(f"{stage}/alerts/{policy}/false_alarms", s["clean"]["false_alarms"]["per_episode"]["mean"], 0)
        for where, events in [("clean", s["clean"]["events"]), *((k, f["events"]) for k, f in s["faults"].items())]:
            for e in events:
                tb.scalar(f"{stage}/alerts/{policy}/{e['agent']}/{e['kind']}", e["score"], e["step"])
            if events:
                tb.text(f"{stage}/alerts/{policy}/events/{where}", "\n".join(
                    f"{where}: episode {e['seed']} step {e['step']}: {e['agent']} {e['kind']} {e['score']:.3g} > "
                    f"{e['threshold']:.3g}" for e in events))
        for label, f in s["faults"].items():
            tb.scalar(f"{stage}/alerts/{policy}/{label}/detected", f["detected"]["mean"], 0)
            tb.scalar(f"{stage}/alerts/{policy}/{label}/delay", f["delay"]["mean"], 0)


def write_alerts(reports: Path, cfg: DictConfig, episodes: int, seed: int, sections: dict[str, dict[str, Any]]) -> None:
    """``reports/alerts.json``: the alert settings, the watched episodes and each policy's section."""
    import json

    from omegaconf import OmegaConf

    from madistill.common.io import atomic_write_text

    meta = {"alerts": OmegaConf.to_container(cfg.alerts, resolve=True), "episodes": episodes, "seed": seed}
    atomic_write_text(reports / "alerts.json", json.dumps({"meta": meta, "policies": sections}, indent=2))


def alerts_line(reports: Path) -> str:
    """The terminal's line on where a stage's alerts are."""
    return f"alerts:      {reports / 'alerts.json'} (detection and false alarms: the report's Online alerts)"


def alerts_markdown(sections: dict[str, dict[str, Any]], cfg: DictConfig) -> str:
    """The report section: per policy, false alarms per clean episode and, per fault, detection rate and delay."""

    def ci(m: dict[str, float], fmt: str = ".2f") -> str:
        return "-" if m["n"] == 0 else f"{m['mean']:{fmt}} [{m['lo']:{fmt}}, {m['hi']:{fmt}}]"

    ac = cfg.alerts
    lines = ["## Online alerts", "",
             f"Scores: {', '.join(map(str, ac.scores))}; thresholds calibrated on {ac.calibration_episodes} clean episodes "
             f"(seeds from {ac.calibration_seed}) to a share of {ac.false_alarm_rate:g} clean episodes with any alert; events in "
             "`alerts.json` (docs/cascade.md, Online alerts). Detected: a victim raises an alert at or after the onset; "
             "delay: steps from the onset to it. 95% bootstrap CIs over episodes.", "",
             "| policy | fault | false alarms per clean episode | detected | delay (steps) |", "|---|---|---|---|---|"]
    for policy, s in sections.items():
        alarms = ci(s["clean"]["false_alarms"]["per_episode"], ".3f")
        lines += [f"| {policy} | {label} | {alarms} | {ci(f['detected'])} | {ci(f['delay'], '.1f')} |"
                  for label, f in s["faults"].items()] or [f"| {policy} | none | {alarms} | - | - |"]
    return "\n".join(lines) + "\n"
