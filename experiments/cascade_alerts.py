"""Online alerts of the cascade monitor (issue 20 item 6): detection rate, delay and false alarms per clean episode.

For each saved team: thresholds calibrated on ``alerts.calibration_episodes`` clean episodes (seeds from
``alerts.calibration_seed``) to ``alerts.false_alarm_rate``; false alarms counted on held-out clean episodes
(seeds from 10000); then each fault of the registry (madistill/cascade/faults.py) on every agent alone, from
step ``--onset`` to the episode's end, on the same held-out seeds with greedy actions, so each faulted episode
has a clean twin that differs only by the fault: observation faults are the attack suite's ``pgd`` and
``random`` at its middle budget (``attack.eps``), action faults ``random``, ``stuck`` and ``dead``. Per fault and
victim: the share of episodes where the victim raises an alert at or after the onset (detection rate), the steps
from the onset to that alert (delay), and, in episodes where another agent fails (the cascade monitor's
definition: its action distribution's total variation from the clean twin's exceeds ``cascade.threshold``),
whether the victim's alert came strictly before the first such failure (failures from the cascade monitor's
paired runs, ``madistill.cascade.paired``). 95% percentile-bootstrap CIs over episodes (pooled over the runs
given for one env).

``--scores obs surprise disagreement`` adds the disagreement with a reference policy, ``KL(reference(o) ||
pi(o))`` on the observation the teacher acts on: the reference is each run's DIGR student (its ``student``
policy), or ``--references`` (one run or policy directory per run, in order). False alarms and detections are
then counted per score as well (``clean_alerts_by_kind``; ``detected_by_score`` and ``delay_by_score``), all scores
calibrated together to the one target rate. ``--faults`` picks faults, ``--out`` the results file.

    for s in 0 1 2; do
      madistill train env=relay teacher.total_agent_steps=200000 'teacher.hidden_sizes=[64,64]' seed=$s \
          env.num_workers=0 hydra.run.dir=runs/alerts/relay_s$s
      madistill train env=simple_speaker_listener_v4 teacher.total_agent_steps=400000 \
          'teacher.hidden_sizes=[64,64]' seed=$s env.num_workers=0 hydra.run.dir=runs/alerts/sl_s$s
    done
    python experiments/cascade_alerts.py runs/alerts/relay_s{0,1,2} runs/alerts/sl_s{0,1,2}
    # the disagreement score next to the others (teacher and DIGR student in one pipeline run)
    python experiments/cascade_alerts.py <pipeline run s0> <s1> <s2> --scores obs surprise disagreement \
        --out experiments/results/cascade_alerts_disagreement.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from madistill.cascade.alerts import Detection, configured_monitor, mean_ci, monitor_episodes, watch_fault
from madistill.cascade.faults import FaultEnv, make_fault
from madistill.common.io import atomic_write_text
from madistill.config import AlertConfig, AttackConfig, CascadeConfig, FaultConfig
from madistill.envs.features import feature_layouts
from madistill.envs.vector import MultiAgentVecEnv
from madistill.evaluate.evaluator import discover_policies, saved_env
from madistill.policies.store import load_team
from madistill.stages.policies import run_policy_dir

EVAL_SEED = 10_000
RESULTS = Path(__file__).parent / "results" / "cascade_alerts.json"
FAULTS = {"obs pgd": {"name": "attack", "method": "pgd"}, "obs random": {"name": "attack", "method": "random"},
          "act random": {"name": "random"}, "act stuck": {"name": "stuck"}, "act dead": {"name": "dead"}}


def study(path: str, episodes: int, clean_episodes: int, onset: int, alerts: AlertConfig, num_envs: int,
          faults: Sequence[str] = tuple(FAULTS)) -> dict:
    """Calibration, false alarms on ``clean_episodes`` held-out clean episodes and each of ``faults`` on every agent
    in the first ``episodes`` of them, for the teacher saved under ``path``: per-episode outcomes."""
    refs = discover_policies(path, ["teacher"])
    spec = saved_env(refs)
    attack, cc = OmegaConf.structured(AttackConfig), CascadeConfig()

    def make_venv(n: int, period: int) -> MultiAgentVecEnv:
        return MultiAgentVecEnv(spec, n, seed_period=period)

    with MultiAgentVecEnv(spec, num_envs) as venv:
        team, _ = load_team(refs[0].path, venv.groups)
        team.eval()
        monitor = configured_monitor(alerts, venv, team)
        monitor_episodes(venv, monitor, clean_episodes, EVAL_SEED)
        fenv = FaultEnv(venv.groups, feature_layouts(venv.groups, {}, venv.feature_names), attack, team.device)
    eps = sorted(attack.eps)[len(attack.eps) // 2]
    clean = range(EVAL_SEED, EVAL_SEED + clean_episodes)
    out = {"env": spec.id, "agents": monitor.agents, "thresholds": monitor.thresholds_dict(), "eps": eps,
           "clean_alerts": [sum(e.seed == s for e in monitor.events) for s in clean],
           "clean_alerts_by_kind": {k: [sum(e.seed == s and e.kind == k for e in monitor.events) for s in clean]
                                    for k in monitor.kinds}, "reference": alerts.reference, "faults": {}}
    for fname in faults:
        fc = FAULTS[fname]
        for victim in monitor.agents:
            cfg = OmegaConf.merge(OmegaConf.structured(FaultConfig),
                                  {**fc, "victims": [victim], "onset": onset, "duration": None, "eps": eps})
            detection = watch_fault(make_venv, monitor, make_fault(cfg, fenv), episodes, EVAL_SEED, cc.threshold,
                                    return_loss=cc.return_loss, max_copies=cc.max_copies)
            out["faults"][f"{fname} / {victim}"] = detection.to_dict()
    return out


def summary(studies: list[dict]) -> dict:
    """Per fault and victim, the pooled detections of the studies of one env, and the clean false alarms."""
    clean = np.concatenate([s["clean_alerts"] for s in studies]).astype(float)
    by_kind = {k: np.concatenate([s["clean_alerts_by_kind"][k] for s in studies]).astype(float)
               for k in studies[0]["clean_alerts_by_kind"]}
    faults = {name: Detection.pooled([Detection.from_dict(s["faults"][name]) for s in studies])
              for name in studies[0]["faults"]}
    return {"clean_alerted_episodes": mean_ci(clean > 0), "clean_alerts_per_episode": mean_ci(clean),
            "clean_alerted_episodes_by_kind": {k: mean_ci(n > 0) for k, n in by_kind.items()},
            "faults": {name: d.summary() for name, d in faults.items()}}


def table(env: str, s: dict) -> str:
    """One env's summary as markdown."""

    def ci(m: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
        if not m["n"]:
            return "-"
        return f"{scale * m['mean']:.{digits}f} [{scale * m['lo']:.{digits}f}, {scale * m['hi']:.{digits}f}]"

    lines = [f"### {env}", "",
             f"clean held-out episodes with any alert: {ci(s['clean_alerted_episodes'])}% of "
             f"{s['clean_alerted_episodes']['n']} (alerts per episode {ci(s['clean_alerts_per_episode'], 1.0, 3)}); "
             "by score: " + ", ".join(f"{k} {ci(v)}%" for k, v in s["clean_alerted_episodes_by_kind"].items()), "",
             "| fault / victim | detected % | delay (steps) | detected by score % | delay by score (steps) | others fail % "
             "| alert first % |", "|---|---|---|---|---|---|---|"]
    for name, r in s["faults"].items():
        by = ", ".join(f"{k} {100 * v:.0f}" for k, v in r["detected_by_score"].items())
        delay = ", ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in r["delay_by_score"].items())
        lines.append(f"| {name} | {ci(r['detected'])} | {ci(r['delay'], 1.0)} | {by} | {delay} | {ci(r['others_fail'])} | "
                     f"{ci(r['alert_before_failure'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="teacher run directories")
    p.add_argument("--episodes", type=int, default=100, help="faulted episodes per fault and victim")
    p.add_argument("--clean-episodes", type=int, default=1000, help="held-out clean episodes counting false alarms")
    p.add_argument("--onset", type=int, default=5, help="episode step at which faults begin")
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--scores", nargs="+", default=[k.name for k in AlertConfig().scores], help="alerts.scores")
    p.add_argument("--references", nargs="+", default=None,
                   help="the disagreement score's reference per run (default: each run's student policy)")
    p.add_argument("--faults", nargs="+", default=list(FAULTS), choices=list(FAULTS))
    p.add_argument("--min-threshold", type=float, default=AlertConfig().min_threshold, help="alerts.min_threshold")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.references is not None and len(args.references) != len(args.runs):
        p.error(f"--references names {len(args.references)} policies for {len(args.runs)} runs")
    references = args.references or [str(run_policy_dir(r, "student")) if "disagreement" in args.scores else None
                                     for r in args.runs]
    alerts = AlertConfig(scores=args.scores, min_threshold=args.min_threshold)
    studies = [study(r, args.episodes, args.clean_episodes, args.onset, replace(alerts, reference=ref),
                     args.num_envs, args.faults) | {"run": r} for r, ref in zip(args.runs, references, strict=True)]
    envs = dict.fromkeys(s["env"] for s in studies)
    by_env = {env: summary([s for s in studies if s["env"] == env]) for env in envs}
    meta = {"command": shlex.join(["python", *sys.argv]), "alerts": vars(alerts), "references": references,
            "faults": args.faults, "onset": args.onset,
            "episodes": args.episodes, "clean_episodes": args.clean_episodes, "eval_seed": EVAL_SEED,
            "failure_threshold": CascadeConfig().threshold, "failure_return_loss": CascadeConfig().return_loss}
    # per-episode outcomes without indentation: they make most of the file
    atomic_write_text(args.out, json.dumps({"meta": meta, "summary": by_env, "studies": studies}))
    print("\n\n".join(table(env, s) for env, s in by_env.items()))
    print(f"\n{meta['command']}\nresults: {args.out}")


if __name__ == "__main__":
    main()
