"""The batched mpe2 backend over the whole loop, against the PettingZoo backend and the SB3 + SuperSuit tutorial,
ratios side by side from one run (simple_spread_v3, N=3):

- teacher training at the tutorial recipe's PPO settings, network and agent-step budget
  (experiments/bench_throughput.py): agent-steps/s and the shares of wall time in env stepping, the rest of
  the rollout (acting, SB3's buffer) and PPO's updates, one torch thread; madistill with its fast PPO update
  (the default), and the large batched row once more with the update in one thread and with SB3's own
  ``train()``; every row once per round, ``--repeats`` rounds, the median and range of each row's ratio to the
  tutorial's rate in the same round;
- the stages on one saved teacher, on the same episodes under both backends, each at its defaults (env copies
  and workers as a user gets them): ``madistill evaluate`` (greedy and the random team, per-episode sampling
  streams), ``madistill attack`` with a preset (``--attack``), ``madistill attack`` with the default suite,
  and ``madistill cascade`` of one fault (``fault=random`` on agent_0), and ``startup``: ``madistill evaluate``
  of one episode without the random team, the fixed cost of a stage's process (imports, composing the config,
  loading the policy, writing reports), which bounds every stage's ratio: no stage's batched run takes less.
  Each run is a fresh process, as a user's; the runs take turns between the backends (``--repeats`` each).
  Per stage: the median wall time and CPU time (of the process and its env workers) per backend, the ratios
  of both, whether every run reported identical numbers, the load average, and (with ``startup``) the most
  the wall ratio can be while a batched run pays the start-up: the PettingZoo path's wall time over the
  batched ``startup`` wall time.

    python experiments/bench_batched_loop.py [--policy runs/train/...] [--parts training stages]
        [--train-steps 393216] [--copies 1024] [--stages evaluate attack suite cascade startup] [--repeats 3]
        [--episodes 1000] [--attack quick] [--attack-episodes 100] [--suite-episodes 50]
        [--cascade-episodes 20] [--seed 0] [--out experiments/results/bench_batched_loop.json]

Without ``--policy`` it first trains a small spread teacher (``--teacher-steps``) for the stages.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_throughput import baseline, madistill_run

from madistill.cli import main as cli

TUTORIAL_COPIES = 8  # the tutorial recipe's copies (bench_throughput.py's default)
BACKENDS = ("pettingzoo", "batched")


def training_rows(steps: int, copies: int, seed: int, repeats: int) -> dict[str, dict[str, object]]:
    """Agent-steps/s and time shares of the tutorial, madistill on PettingZoo, and madistill batched: every
    variant once per round, ``repeats`` rounds; per variant the median of its rounds, and its rate over the
    faster tutorial row's of the same round (median and range over the rounds)."""
    rounds: list[dict[str, dict[str, float]]] = []
    for _ in range(repeats):
        rows = {}
        for cpus in (1, 2):
            sps, env = baseline(TUTORIAL_COPIES, steps, cpus, seed)
            rows[f"tutorial SB3+SuperSuit, {TUTORIAL_COPIES} copies, num_cpus={cpus}"] = {"agent_steps_per_s": sps, "env": env}
        # the last rows: the same run with the fast update in one thread (teacher.ppo.critic_thread=false), and with
        # SB3's own PPO.train() in place of madistill's fast update
        runs = [("pettingzoo", TUTORIAL_COPIES, 2, "fast"), ("batched", TUTORIAL_COPIES, 0, "fast"),
                ("batched", copies, 0, "fast"), ("batched", copies, 0, "one thread"), ("batched", copies, 0, "SB3")]
        for backend, n, workers, update_kind in runs:
            sps, env, update = madistill_run(n, steps, workers, seed, "inline", backend, fast_update=update_kind != "SB3",
                                             critic_thread=update_kind == "fast")
            label = {"fast": "", "one thread": ", fast update in one thread", "SB3": ", SB3 train()"}[update_kind]
            rows[f"madistill {backend}, {n} copies, {workers} workers{label}"] = {
                "agent_steps_per_s": sps, "env": env, "update": update, "rest_of_rollout": 1 - env - update}
        tutorial = max(r["agent_steps_per_s"] for name, r in rows.items() if name.startswith("tutorial"))
        for r in rows.values():
            r["x_tutorial"] = r["agent_steps_per_s"] / tutorial
        rounds.append(rows)
    summary: dict[str, dict[str, object]] = {}
    for name in rounds[0]:
        runs_of = [rows[name] for rows in rounds]
        summary[name] = {key: statistics.median(r[key] for r in runs_of) for key in runs_of[0]}
        summary[name]["x_tutorial_range"] = [min(r["x_tutorial"] for r in runs_of), max(r["x_tutorial"] for r in runs_of)]
        summary[name]["rounds"] = runs_of
    return summary


# "suite": madistill attack with the default attack suite; "startup": an evaluation of one episode
STAGES = ("evaluate", "attack", "suite", "cascade", "startup")


def stage_args(stage: str, policy: str, args: argparse.Namespace) -> list[str]:
    """The ``madistill`` command line of one benchmarked stage, without the backend."""
    if stage == "evaluate":
        return ["evaluate", f"eval.policy={policy}", f"eval.episodes={args.episodes}", "eval.episode_streams=true"]
    if stage == "startup":
        return ["evaluate", f"eval.policy={policy}", "eval.episodes=1", "eval.random_baseline=false"]
    if stage == "attack":
        return ["attack", f"attack.policy={policy}", f"attack={args.attack}", f"attack.episodes={args.attack_episodes}"]
    if stage == "suite":
        return ["attack", f"attack.policy={policy}", "attack=suite", f"attack.episodes={args.suite_episodes}"]
    return ["cascade", f"cascade.policy={policy}", "fault=random", "fault.victims=[agent_0]",
            f"cascade.episodes={args.cascade_episodes}"]


def _reports(stage: str, run_dir: Path) -> object:
    """The numbers a stage reported: every evaluated policy's episodes and summary, the robustness results, or
    the cascade report."""
    reports = run_dir / "reports"
    if stage in ("evaluate", "startup"):
        return {p.name: json.loads(p.read_text()) for p in sorted(reports.glob("eval_*.json"))}
    if stage == "cascade":
        return json.loads((reports / "cascade.json").read_text())
    results = json.loads((reports / "robustness.json").read_text())["results"]
    for result in results.values():  # wall times, which differ from run to run whatever the backend
        del result["seconds_per_evaluation"]
    return results


def timed_run(command: list[str], out: Path) -> tuple[float, float]:
    """Run ``madistill <command>`` in a fresh process, as a user would; its wall time and the CPU time (user and
    system) of it and the env worker processes it waited for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "madistill", *command, f"hydra.run.dir={out}", "logger=quiet",
                           "logger.figures=false"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"madistill {' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def stage_rows(policy: str, args: argparse.Namespace, tmp: Path) -> dict[str, dict]:
    """Per stage: median wall and CPU time of ``args.repeats`` runs under each backend at its defaults (copies
    and workers as a user gets them), run in turns (pettingzoo, batched, pettingzoo, ...) so load from other
    processes falls on both; the ratios of the medians; whether every run reported the same numbers; the load
    average (1 min) before and after the stage."""
    rows = {}
    for stage in args.stages:
        times: dict[str, dict[str, list[float]]] = {b: {"wall": [], "cpu": []} for b in BACKENDS}
        numbers, load = [], [os.getloadavg()[0]]
        for rep in range(args.repeats):
            for backend in BACKENDS:
                out = tmp / f"{stage}-{backend}-{rep}"
                wall, cpu = timed_run([*stage_args(stage, policy, args), f"env.backend={backend}"], out)
                times[backend]["wall"].append(wall)
                times[backend]["cpu"].append(cpu)
                print(f"{stage} {backend} run {rep + 1}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
                numbers.append(_reports(stage, out))
                shutil.rmtree(out)
        load.append(os.getloadavg()[0])
        median = {b: {k: statistics.median(v) for k, v in t.items()} for b, t in times.items()}
        rows[stage] = {"command": stage_args(stage, "<policy>", args), "seconds": times, "median": median,
                       "speedup_wall": median["pettingzoo"]["wall"] / median["batched"]["wall"],
                       "speedup_cpu": median["pettingzoo"]["cpu"] / median["batched"]["cpu"],
                       "identical": all(n == numbers[0] for n in numbers), "load_average": load}
    if "startup" in rows:  # no batched run takes less than a process's fixed cost: the most each ratio can be
        floor = rows["startup"]["median"]["batched"]["wall"]
        for r in rows.values():
            r["startup_bound_wall"] = r["median"]["pettingzoo"]["wall"] / floor
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", help="a saved spread teacher (default: train one with --teacher-steps)")
    ap.add_argument("--teacher-steps", type=int, default=300_000)
    ap.add_argument("--parts", nargs="+", choices=("training", "stages"), default=["training", "stages"])
    ap.add_argument("--train-steps", type=int, default=3 * 128 * 1024, help="agent-steps per training row")
    ap.add_argument("--copies", type=int, default=1024, help="env copies of the large batched training row")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each stage per backend, in turns; rounds of the training rows")
    ap.add_argument("--episodes", type=int, default=1000, help="evaluation episodes")
    ap.add_argument("--attack", default="quick", help="the attack preset of the attack stage (conf/attack/)")
    ap.add_argument("--attack-episodes", type=int, default=100)
    ap.add_argument("--suite-episodes", type=int, default=50, help="episodes of the default attack suite")
    ap.add_argument("--cascade-episodes", type=int, default=20, help="paired episodes of the cascade study")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_batched_loop.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as bench_throughput.py: small MLPs run fastest so, and it is fair to the tutorial
    load_before = os.getloadavg()[0]
    results: dict[str, object] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        policy = args.policy
        if policy is None and "stages" in args.parts:
            policy = str(Path(tmp) / "teacher")
            if cli(["train", "env=simple_spread_v3", f"seed={args.seed}", f"teacher.total_agent_steps={args.teacher_steps}",
                    f"hydra.run.dir={policy}", "logger=quiet"]) != 0:
                raise SystemExit("training the teacher failed")
        if "stages" in args.parts:
            results["stages"] = stages = stage_rows(str(policy), args, Path(tmp))
            print(f"stages on the same episodes, each backend at its defaults, median of {args.repeats} runs in turns "
                  f"({args.episodes} evaluation episodes, {args.attack_episodes} of attack={args.attack}, "
                  f"{args.suite_episodes} of attack=suite, {args.cascade_episodes} cascade episodes)")
            print(f"{'stage':<9} {'pettingzoo wall':>15} {'batched wall':>12} {'ratio':>6} {'pettingzoo CPU':>14} "
                  f"{'batched CPU':>11} {'ratio':>6}  identical  load")
            for stage, r in stages.items():
                m = r["median"]
                print(f"{stage:<9} {m['pettingzoo']['wall']:>13.1f} s {m['batched']['wall']:>10.1f} s "
                      f"{r['speedup_wall']:>5.1f}x {m['pettingzoo']['cpu']:>12.1f} s {m['batched']['cpu']:>9.1f} s "
                      f"{r['speedup_cpu']:>5.1f}x  {r['identical']!s:<9}  {r['load_average'][0]:.1f}-{r['load_average'][1]:.1f}")
            if "startup" in stages:
                print("the most each wall ratio can be while a batched run pays the start-up (pettingzoo wall / batched "
                      "startup wall): " + ", ".join(f"{k} {r['startup_bound_wall']:.1f}x" for k, r in stages.items()))
    if "training" in args.parts:
        results["training"] = training = training_rows(args.train_steps, args.copies, args.seed, args.repeats)
        print(f"teacher training, simple_spread_v3, {args.train_steps} agent-steps per row, the tutorial's PPO settings, "
              f"median of {args.repeats} rounds (x tutorial: over the faster tutorial row of the same round; range)")
        print(f"{'variant':<66} {'agent-steps/s':>13} {'x tutorial':>10} {'range':>13} {'env':>5} {'rollout':>8} {'update':>7}")
        for name, r in training.items():
            shares = "".join(f"{r[k]:>{w}.0%}" if k in r else f"{'':>{w}}"
                             for k, w in (("env", 6), ("rest_of_rollout", 9), ("update", 8)))
            lo, hi = r["x_tutorial_range"]
            print(f"{name:<66} {r['agent_steps_per_s']:>13.0f} {r['x_tutorial']:>9.2f}x {lo:>5.2f}-{hi:.2f}x{shares}")
    results["load_average"] = load = [load_before, os.getloadavg()[0]]
    print(f"load average (1 min) before and after: {load[0]:.1f}, {load[1]:.1f}")
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
