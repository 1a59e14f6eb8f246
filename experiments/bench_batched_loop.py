"""The batched mpe2 backend over the whole loop, against the PettingZoo backend and the SB3 + SuperSuit tutorial,
ratios side by side from one run (simple_spread_v3, N=3):

- teacher training at the tutorial recipe's PPO settings, network and agent-step budget
  (experiments/bench_throughput.py): agent-steps/s and the shares of wall time in env stepping, the rest of
  the rollout (acting, SB3's buffer) and PPO's updates, one torch thread;
- ``madistill evaluate`` and ``madistill attack`` of one saved teacher on the same episodes under both
  backends: wall time, its ratio, and whether every reported number is identical.

    python experiments/bench_batched_loop.py [--policy runs/train/...] [--train-steps 393216] [--copies 1024]
        [--episodes 1000] [--attack quick] [--attack-episodes 100] [--seed 0]

Without ``--policy`` it first trains a small spread teacher (``--teacher-steps``) to evaluate and attack.
Writes experiments/results/bench_batched_loop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from bench_throughput import baseline, madistill_run

from madistill.cli import main as cli

TUTORIAL_COPIES = 8  # the tutorial recipe's copies (bench_throughput.py's default)


def training_rows(steps: int, copies: int, seed: int) -> dict[str, dict[str, float]]:
    """Agent-steps/s and time shares of the tutorial, madistill on PettingZoo, and madistill batched."""
    rows = {}
    for cpus in (1, 2):
        sps, env = baseline(TUTORIAL_COPIES, steps, cpus, seed)
        rows[f"tutorial SB3+SuperSuit, {TUTORIAL_COPIES} copies, num_cpus={cpus}"] = {"agent_steps_per_s": sps, "env": env}
    runs = [("pettingzoo", TUTORIAL_COPIES, 2), ("batched", TUTORIAL_COPIES, 0), ("batched", copies, 0)]
    for backend, n, workers in runs:
        sps, env, update = madistill_run(n, steps, workers, seed, "inline", backend)
        rows[f"madistill {backend}, {n} copies, {workers} workers"] = {
            "agent_steps_per_s": sps, "env": env, "update": update, "rest_of_rollout": 1 - env - update}
    return rows


def _reports(stage: str, run_dir: Path) -> object:
    """The numbers a stage reported: every evaluated policy's episodes and summary, or the robustness results."""
    reports = run_dir / "reports"
    if stage == "evaluate":
        return {p.name: json.loads(p.read_text()) for p in sorted(reports.glob("eval_*.json"))}
    results = json.loads((reports / "robustness.json").read_text())["results"]
    for result in results.values():  # wall times, which differ from run to run whatever the backend
        del result["seconds_per_evaluation"]
    return results


def stage_rows(policy: str, copies: int, episodes: int, attack: str, attack_episodes: int, tmp: Path) -> dict[str, dict]:
    """Wall time of ``evaluate`` and ``attack`` under each backend, the ratio, and whether the reports agree."""
    stages = {"evaluate": [f"eval.policy={policy}", f"eval.episodes={episodes}", "eval.episode_streams=true"],
              "attack": [f"attack.policy={policy}", f"attack={attack}", f"attack.episodes={attack_episodes}"]}
    rows = {}
    for stage, args in stages.items():
        wall, numbers = {}, {}
        for backend in ("pettingzoo", "batched"):
            out = tmp / f"{stage}-{backend}"
            t0 = time.perf_counter()
            rc = cli([stage, *args, f"hydra.run.dir={out}", f"env.backend={backend}", f"env.num_envs={copies}",
                      "logger=quiet", "logger.figures=false"])
            wall[backend] = time.perf_counter() - t0
            if rc != 0:
                raise SystemExit(f"madistill {stage} with env.backend={backend} failed ({rc})")
            numbers[backend] = _reports(stage, out)
        rows[stage] = {"seconds": wall, "speedup": wall["pettingzoo"] / wall["batched"],
                       "identical": numbers["pettingzoo"] == numbers["batched"]}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", help="a saved spread teacher (default: train one with --teacher-steps)")
    ap.add_argument("--teacher-steps", type=int, default=300_000)
    ap.add_argument("--train-steps", type=int, default=3 * 128 * 1024, help="agent-steps per training row")
    ap.add_argument("--copies", type=int, default=1024, help="env copies of the large batched rows")
    ap.add_argument("--episodes", type=int, default=1000, help="evaluation episodes")
    ap.add_argument("--attack", default="quick", help="the attack preset (conf/attack/)")
    ap.add_argument("--attack-episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as bench_throughput.py: small MLPs run fastest so, and it is fair to the tutorial
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        policy = args.policy
        if policy is None:
            policy = str(Path(tmp) / "teacher")
            if cli(["train", "env=simple_spread_v3", f"seed={args.seed}", f"teacher.total_agent_steps={args.teacher_steps}",
                    f"hydra.run.dir={policy}", "logger=quiet"]) != 0:
                raise SystemExit("training the teacher failed")
        stages = stage_rows(policy, args.copies, args.episodes, args.attack, args.attack_episodes, Path(tmp))
    training = training_rows(args.train_steps, args.copies, args.seed)
    tutorial = max(v["agent_steps_per_s"] for k, v in training.items() if k.startswith("tutorial"))
    print(f"teacher training, simple_spread_v3, {args.train_steps} agent-steps per row, the tutorial's PPO settings")
    print(f"{'variant':<52} {'agent-steps/s':>13} {'x tutorial':>10} {'env':>5} {'rollout':>8} {'update':>7}")
    for name, r in training.items():
        r["x_tutorial"] = r["agent_steps_per_s"] / tutorial
        shares = "".join(f"{r[k]:>{w}.0%}" if k in r else f"{'':>{w}}" for k, w in (("env", 6), ("rest_of_rollout", 9),
                                                                                    ("update", 8)))
        print(f"{name:<52} {r['agent_steps_per_s']:>13.0f} {r['x_tutorial']:>9.2f}x{shares}")
    print(f"\nstages on the same episodes, {args.copies} copies ({args.episodes} evaluation episodes, "
          f"{args.attack_episodes} attack episodes of attack={args.attack})")
    for stage, r in stages.items():
        s = r["seconds"]
        print(f"{stage:<9} pettingzoo {s['pettingzoo']:7.1f} s  batched {s['batched']:7.1f} s  "
              f"{r['speedup']:5.1f}x  identical numbers: {r['identical']}")
    load = [load_before, os.getloadavg()[0]]
    print(f"load average (1 min) before and after: {load[0]:.1f}, {load[1]:.1f}")
    out = Path(__file__).parent / "results" / "bench_batched_loop.json"
    out.write_text(json.dumps({"settings": vars(args), "load_average": load, "training": training, "stages": stages},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
