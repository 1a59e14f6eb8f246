"""Online alerts of the cascade monitor (issue 20 item 6): detection rate, delay and false alarms per clean episode.

For each saved team: thresholds calibrated on ``alerts.calibration_episodes`` clean episodes (seeds from
``alerts.calibration_seed``) to ``alerts.false_alarm_rate``; false alarms counted on held-out clean episodes
(seeds from 10000); then every fault on every agent alone, from step ``--onset`` to the episode's end, on the
same held-out seeds with greedy actions, so each faulted episode has a clean twin that differs only by the
fault. Per fault and victim: the share of episodes where the victim raises an alert at or after the onset
(detection rate), the steps from the onset to that alert (delay), and, in episodes where another agent fails
(its greedy action leaves the clean twin's), whether the victim's alert came strictly before the first such
failure. 95% percentile-bootstrap CIs over episodes.

    madistill train env=relay teacher.total_agent_steps=200000 'teacher.hidden_sizes=[64,64]' seed=0 \\
        hydra.run.dir=runs/alerts/relay_s0
    madistill train env=simple_speaker_listener_v4 teacher.total_agent_steps=400000 \\
        'teacher.hidden_sizes=[64,64]' seed=0 hydra.run.dir=runs/alerts/sl_s0
    python experiments/cascade_alerts.py runs/alerts/relay_s0 runs/alerts/sl_s0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from madistill.attacks.budget import group_budgets
from madistill.attacks.robustness import suite_attack
from madistill.attacks.transform import AttackTransform
from madistill.cascade.alerts import AlertMonitor, calibrated_monitor, first_alerts, monitor_episodes, track_episodes
from madistill.config import AlertConfig, AttackConfig
from madistill.envs.vector import MultiAgentVecEnv
from madistill.evaluate.report import atomic_write_text
from madistill.evaluate.stats import bootstrap_ci
from madistill.evaluate.evaluator import discover_policies, saved_env
from madistill.explain.saliency import feature_layouts
from madistill.policies.store import load_team
from madistill.rollout import Rollout, Transition
from madistill.transforms import ObsTransform, StepContext

EVAL_SEED = 10_000
RESULTS = Path(__file__).parent / "results" / "cascade_alerts.json"


class FromOnset(ObsTransform):
    """``inner`` applied from episode step ``onset`` on (the same copies keep their clean observations before)."""

    def __init__(self, inner: ObsTransform, onset: int):
        self.inner, self.onset = inner, onset

    def __call__(self, obs: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor]:
        out = self.inner(obs, ctx)
        late = torch.as_tensor(ctx.episode_step >= self.onset, device=ctx.team.device)
        return {g: torch.where(late[:, None, None], out[g], obs[g]) for g in obs}


def played_actions(venv: MultiAgentVecEnv, monitor: AlertMonitor, episodes: int, seed: int,
                   transforms: Sequence[ObsTransform] = ()) -> dict[int, np.ndarray]:
    """Play episodes under the monitor; returns each episode's greedy actions ``[steps, agents]``."""
    rows: dict[int, list[np.ndarray]] = {}

    def record(tr: Transition, seeds: np.ndarray, steps: np.ndarray, ended: np.ndarray) -> None:
        acts = np.concatenate([tr.actions[g.name].cpu().numpy() for g in monitor.team.groups], axis=1)
        for i, s in enumerate(seeds):
            rows.setdefault(int(s), []).append(acts[i])

    rollout = Rollout(venv, monitor.team, transforms=transforms, deterministic=True, seed=seed, episode_streams=True)
    hooks = [monitor.hook(rollout), track_episodes(rollout, record)]
    rollout.run(episodes=episodes, on_step=lambda tr: [h(tr) for h in hooks])
    return {s: np.stack(rows[s]) for s in range(seed, seed + episodes)}


def first_failures(clean: dict[int, np.ndarray], faulted: dict[int, np.ndarray], others: list[int], onset: int) -> np.ndarray:
    """Per episode, the first step at or after ``onset`` where an agent of ``others`` acts otherwise than in the
    clean twin (NaN: none)."""
    out = []
    for s, acts in faulted.items():
        differ = np.flatnonzero((acts[onset:, others] != clean[s][onset:, others]).any(1))
        out.append(onset + differ[0] if len(differ) else np.nan)
    return np.array(out, dtype=np.float64)


def mean_ci(x: np.ndarray) -> dict[str, float]:
    """Mean and 95% bootstrap CI (NaN for an empty sample)."""
    if len(x) == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    lo, hi = bootstrap_ci(x, np.mean, n_boot=2000, seed=0)
    return {"mean": float(np.mean(x)), "lo": lo, "hi": hi, "n": int(len(x))}


def study(path: str, episodes: int, onset: int, alerts: AlertConfig, attack: AttackConfig, num_envs: int) -> dict:
    refs = discover_policies(path, ["teacher"])
    spec = saved_env(refs)
    with MultiAgentVecEnv(spec, num_envs) as venv:
        team, _ = load_team(refs[0].path, venv.groups)
        team.eval()
        start = time.perf_counter()
        monitor = calibrated_monitor(venv, team, alerts.scores, alerts.false_alarm_rate, alerts.calibration_episodes,
                                     alerts.calibration_seed)
        seeds = list(range(EVAL_SEED, EVAL_SEED + episodes))
        clean = played_actions(venv, monitor, episodes, EVAL_SEED)
        per_episode = np.array([sum(e.seed == s for e in monitor.events) for s in seeds], dtype=np.float64)
        out = {"env": spec.id, "policy": str(refs[0].path), "agents": monitor.agents, "thresholds": monitor.thresholds_dict(),
               "clean": {"alerted_episodes": mean_ci((per_episode > 0).astype(float)),
                         "alerts_per_episode": mean_ci(per_episode)}, "faults": {}}
        eps = sorted(attack.eps)[len(attack.eps) // 2]
        budgets = group_budgets(eps, feature_layouts(venv.groups), attack.exclude, team.device)
        for fault in ("pgd", "random"):
            for a, victim in enumerate(monitor.agents):
                faulted_monitor = AlertMonitor(team, alerts.scores, monitor.thresholds)
                transform = FromOnset(AttackTransform(suite_attack(fault, attack), [victim], budgets), onset)
                faulted = played_actions(venv, faulted_monitor, episodes, EVAL_SEED, [transform])
                first = first_alerts(faulted_monitor.events, victim, seeds, onset)
                fail = first_failures(clean, faulted, [b for b in range(len(monitor.agents)) if b != a], onset)
                failed = np.isfinite(fail)
                out["faults"][f"obs:{fault}@{eps}/{victim}"] = {
                    "detected": mean_ci(np.isfinite(first).astype(float)),
                    "delay": mean_ci(first[np.isfinite(first)] - onset),
                    "by_score": {k: float(np.isfinite(first_alerts([e for e in faulted_monitor.events if e.kind == k],
                                                                   victim, seeds, onset)).mean())
                                 for k in alerts.scores},
                    "downstream_failed": float(failed.mean()),
                    "alert_before_failure": mean_ci((first[failed] < fail[failed]).astype(float)),
                }
        out["seconds"] = time.perf_counter() - start
    return out


def table(result: dict) -> str:
    """The result of one team as markdown."""
    c = result["clean"]

    def ci(m: dict[str, float], pct: bool = True) -> str:
        f = 100.0 if pct else 1.0
        return f"{f * m['mean']:.1f} [{f * m['lo']:.1f}, {f * m['hi']:.1f}]" if m["n"] else "-"

    lines = [f"### {result['env']} ({result['policy']})", "",
             f"clean held-out episodes with any alert: {ci(c['alerted_episodes'])}% "
             f"(alerts per episode {ci(c['alerts_per_episode'], False)})", "",
             "| fault / victim | detected % | delay (steps) | by score % | others fail % | alert before failure % |",
             "|---|---|---|---|---|---|"]
    for name, r in result["faults"].items():
        by = ", ".join(f"{k} {100 * v:.0f}" for k, v in r["by_score"].items())
        lines.append(f"| {name} | {ci(r['detected'])} | {ci(r['delay'], False)} | {by} | "
                     f"{100 * r['downstream_failed']:.0f} | {ci(r['alert_before_failure'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="teacher run directories")
    p.add_argument("--episodes", type=int, default=200, help="held-out clean and faulted episodes per fault")
    p.add_argument("--onset", type=int, default=5, help="episode step at which faults begin")
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    alerts, attack = AlertConfig(), AttackConfig()
    results = [study(r, args.episodes, args.onset, alerts, attack, args.num_envs) for r in args.runs]
    meta = {"command": " ".join(["python", *sys.argv]), "alerts": vars(alerts), "onset": args.onset,
            "episodes": args.episodes, "eval_seed": EVAL_SEED}
    atomic_write_text(args.out, json.dumps({"meta": meta, "results": results}, indent=2))
    print("\n\n".join(table(r) for r in results))
    print(f"\n{meta['command']}\nresults: {args.out}")


if __name__ == "__main__":
    main()
