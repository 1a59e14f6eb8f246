"""Env stepping speed: mpe2's parallel_env, madistill's PettingZoo vector env and the batched backend, side by side.

Random actions, every copy auto-resetting at its episode's end. Rows per scenario:

- ``mpe2 parallel_env``: one env from mpe2's ``parallel_env``, stepped in a Python loop (the reference);
- ``pettingzoo vector env``: ``MultiAgentVecEnv(backend="pettingzoo")`` with env.num_envs / env.num_workers at
  their config defaults;
- ``batched, N copies``: ``MultiAgentVecEnv(backend="batched")`` in this process, for each N in ``--copies``
  (and ``batched, N copies, W workers`` split over W worker processes, for each W > 0 in ``--workers``).

Each row is env-steps/s (one env-step = one step of one copy, all its agents acting), the best of
``--repeats`` timings of about ``--seconds`` each, taken round robin over the rows, and its ratio to the
mpe2 row. Writes ``experiments/results/bench_batched_env.json`` (``bench_batched_env_continuous.json``
with ``--continuous``), or ``--out``.

    python experiments/bench_batched_env.py [--scenarios simple_spread_v3 ...] [--copies 64 1024 4096]
    python experiments/bench_batched_env.py --scenarios simple_spread_v3 --copies 16 1024 --workers 0 2 \
        --out experiments/results/bench_batched_env_workers.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from madistill.config import EnvConfig
from madistill.envs import EnvSpec, MultiAgentVecEnv
from madistill.envs.batched import PORTS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ACTION_POOL = 32  # distinct random action sets cycled through, so drawing them is not timed


class _Runner:
    """One row: a step function advancing ``n_per_call`` env-steps, called enough times to last ``seconds``."""

    def __init__(self, step_once: Callable[[int], object], n_per_call: int, seconds: float):
        self.step_once, self.n_per_call = step_once, n_per_call
        calls = 1
        while True:  # calibrate the number of calls to the wanted duration
            t = time.perf_counter()
            for k in range(calls):
                step_once(k)
            elapsed = time.perf_counter() - t
            if elapsed > 0.2 * seconds:
                break
            calls *= 2
        self.calls = max(1, int(calls * seconds / max(elapsed, 1e-9)))
        self.best = 0.0

    def time(self) -> None:
        """One timing; keeps the best env-steps/s."""
        t = time.perf_counter()
        for k in range(self.calls):
            self.step_once(k)
        self.best = max(self.best, self.calls * self.n_per_call / (time.perf_counter() - t))


def mpe2_single(stack: ExitStack, module: str, kwargs: dict, seconds: float) -> _Runner:
    """One mpe2 ``parallel_env``, random actions, reset at each episode's end."""
    env = importlib.import_module(module).parallel_env(**kwargs)
    stack.callback(env.close)
    rng = np.random.default_rng(0)
    for space in (env.action_space(a) for a in env.possible_agents):
        space.seed(int(rng.integers(1 << 31)))
    pool = [{a: env.action_space(a).sample() for a in env.possible_agents} for _ in range(ACTION_POOL)]
    env.reset(seed=0)
    episodes = [0]

    def step(k: int) -> None:
        if not env.agents:
            episodes[0] += 1
            env.reset(seed=episodes[0])
        env.step(pool[k % ACTION_POOL])

    return _Runner(step, 1, seconds)


def vector(stack: ExitStack, module: str, kwargs: dict, copies: int, workers: int, backend: str,
           seconds: float) -> _Runner:
    """``MultiAgentVecEnv`` of ``copies`` copies, random actions (auto-reset inside)."""
    rng = np.random.default_rng(0)
    venv = stack.enter_context(MultiAgentVecEnv(EnvSpec(f"{module}.parallel_env", kwargs), copies,
                                                num_workers=workers, backend=backend))
    pool = [{g.name: (rng.integers(0, g.action_space.n, (copies, g.n_agents)) if g.discrete else
                      rng.uniform(0, 1, (copies, g.n_agents, *g.action_space.shape)).astype(np.float32))
             for g in venv.groups} for _ in range(ACTION_POOL)]
    venv.reset(0)
    return _Runner(lambda k: venv.step(pool[k % ACTION_POOL]), copies, seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenarios", nargs="+", default=[m.rsplit(".", 1)[-1] for m in PORTS])
    p.add_argument("--copies", nargs="+", type=int, default=[64, 1024, 4096])
    p.add_argument("--workers", nargs="+", type=int, default=[0], help="env worker processes of the batched rows")
    p.add_argument("--continuous", action="store_true", help="Box actions (default: Discrete)")
    p.add_argument("--out", type=Path, default=None, help="results file (default: by action type)")
    p.add_argument("--seconds", type=float, default=2.0, help="length of one timing")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    defaults = EnvConfig()
    kwargs = {"continuous_actions": args.continuous}
    # wall-clock rates: the load average says how much other work shared the cores
    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "load_average_start": os.getloadavg()[0], "continuous_actions": args.continuous,
               "seconds": args.seconds, "repeats": args.repeats, "workers": args.workers, "scenarios": {}}
    for name in args.scenarios:
        module = f"mpe2.{name}"
        with ExitStack() as stack:
            runners = {"mpe2 parallel_env, 1 copy": mpe2_single(stack, module, kwargs, args.seconds)}
            runners[f"pettingzoo vector env, {defaults.num_envs} copies, {defaults.num_workers} workers"] = vector(
                stack, module, kwargs, defaults.num_envs, defaults.num_workers, "pettingzoo", args.seconds)
            for n in args.copies:
                for w in args.workers:
                    row = f"batched, {n} copies" + (f", {w} workers" if w else "")
                    runners[row] = vector(stack, module, kwargs, n, w, "batched", args.seconds)
            for _ in range(args.repeats):  # round robin, so a burst of load on the shared cores hits every row
                for runner in runners.values():
                    runner.time()
        rows = {row: runner.best for row, runner in runners.items()}
        base = rows["mpe2 parallel_env, 1 copy"]
        print(f"\n{name} ({'Box' if args.continuous else 'Discrete'} actions)")
        print(f"{'':<46} {'env-steps/s':>12} {'x mpe2':>8}")
        for row, rate in rows.items():
            print(f"{row:<46} {rate:>12,.0f} {rate / base:>8.1f}")
        results["scenarios"][name] = {row: {"env_steps_per_s": rate, "ratio_to_mpe2": rate / base}
                                      for row, rate in rows.items()}
    results["load_average_end"] = os.getloadavg()[0]
    path = args.out or RESULTS_DIR / f"bench_batched_env{'_continuous' if args.continuous else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
