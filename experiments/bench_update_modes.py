"""Teacher-training throughput of each ``teacher.update_mode`` (with and without the fast update's critic thread),
and the cost of one PPO update (SB3's ``train()`` with and without its distribution checks, and madistill's
``fast_train`` in one thread and with its critic thread), side by side.

Trains teachers on simple_spread_v3 (8 copies, the settings of ``bench_throughput.py``) with every update mode
the installed madistill offers, one env worker, and with ``--checks`` each mode once more with torch's
distribution argument checks left on during the PPO update (its distributions then validate their arguments,
as SB3's do by default). Variants are interleaved per repeat so drifts in machine load hit them alike; starting
the env workers is not timed.

    python experiments/bench_update_modes.py [--steps 30720] [--repeats 2] [--checks]
    python experiments/bench_update_modes.py --update [--preset tutorial] [--repeats 2]   # PPO updates alone

Writes ``experiments/results/update_modes_simple_spread_v3.json`` (agent-steps/s per variant and repeat), with
``--update`` ``update_cost_simple_spread_v3[_<preset>].json`` (seconds per update of each variant, 5 x ``--repeats``
interleaved repeats, and the paired ratios with 95% bootstrap intervals).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_throughput import ENV_KWARGS, HIDDEN, PPO_SETTINGS, madistill_run  # noqa: E402


def available_modes() -> list[str]:
    """The update modes the installed madistill accepts."""
    from madistill.config import UpdateMode

    return [m.value for m in UpdateMode]


@contextmanager
def distribution_checks_on() -> Iterator[None]:
    """Keep torch's default distribution validation on for the whole run, whatever the update asks for."""
    with mock.patch.object(torch.distributions.Distribution, "set_default_validate_args", lambda value: None):
        yield


UPDATES = ("SB3 train(), checks off", "SB3 train(), checks on", "fast_train, one thread",
           "fast_train, critic thread")  # the variants --update times
# the paired ratios --update prints: (slower, faster)
RATIOS = ((UPDATES[0], UPDATES[2]), (UPDATES[0], UPDATES[3]), (UPDATES[2], UPDATES[3]), (UPDATES[1], UPDATES[0]))


# --update's PPO settings and networks: the tutorial recipe's (bench_throughput.py), madistill's teacher defaults
# on spread (teacher.ppo, env.num_envs, the spread env's 2x256 teacher), and the spread_batched recipe's (its
# local-critic variant); copies, rollout steps, minibatch size, epochs, hidden sizes
PRESETS = {
    "tutorial": (8, PPO_SETTINGS["n_steps"], PPO_SETTINGS["batch_size"], PPO_SETTINGS["n_epochs"], HIDDEN),
    "teacher_defaults": (16, 100, 1600, 15, [256, 256]),
    "spread_batched": (128, 50, 3200, 10, [64, 64]),
}


def filled_model(preset: str) -> Any:
    """An SB3 PPO of one spread group at the settings of ``preset`` over a full rollout of seeded random
    observations, actions and advantages, every entry live: what the update benchmarks time."""
    from madistill.envs import EnvSpec, group_agents, make_env
    from madistill.teacher import build_model

    env = make_env(EnvSpec("mpe2.simple_spread_v3.parallel_env", ENV_KWARGS))
    (group,) = group_agents(env)
    env.close()
    copies, n_steps, batch_size, n_epochs, hidden = PRESETS[preset]
    arch = {"hidden_sizes": hidden, "activation": "tanh", "team_state_dim": 0}
    ppo = {**PPO_SETTINGS, "n_steps": n_steps, "batch_size": batch_size, "n_epochs": n_epochs}
    model = build_model(group, copies, arch, ppo, 0, "cpu")
    buf, rng = model.rollout_buffer, np.random.default_rng(0)
    buf.observations[:] = rng.normal(size=buf.observations.shape)
    buf.actions[:] = rng.integers(0, group.action_space.n, size=buf.actions.shape)
    buf.advantages[:] = rng.normal(size=buf.advantages.shape)
    buf.valid[:], buf.full = True, True
    return model


def update_cost(preset: str, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per PPO update of one spread group at the settings of ``preset``, wall and the process's CPU
    time (which other jobs on the cores disturb less; it counts both threads of the critic-thread variant),
    interleaved ``repeats`` times: SB3's ``train()`` with torch's distribution checks off (as it runs where the fast
    update does not apply) and on, and madistill's ``fast_train`` in one thread and with ``critic_thread`` (the
    default), all on the same rollout (:func:`filled_model`)."""
    model = filled_model(preset)
    variants = dict(zip(UPDATES, ((False, False, nullcontext), (False, False, distribution_checks_on),
                                  (True, False, nullcontext), (True, True, nullcontext))))
    times: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    for _ in range(repeats):
        for name, (fast, critic_thread, context) in variants.items():
            model.fast_update, model.critic_thread = fast, critic_thread
            with context():
                t, cpu = time.perf_counter(), time.process_time()
                model.train()
                times["wall"].setdefault(name, []).append(time.perf_counter() - t)
                times["cpu"].setdefault(name, []).append(time.process_time() - cpu)
    return times


def paired_ratio(slow: list[float], fast: list[float], n_boot: int = 2000) -> tuple[float, float, float]:
    """Median of the per-repeat ratios ``slow / fast`` (interleaved repeats, so each pair saw the same load) and
    its 95% bootstrap interval."""
    ratios = np.asarray(slow) / np.asarray(fast)
    rng = np.random.default_rng(0)
    boot = [np.median(rng.choice(ratios, len(ratios))) for _ in range(n_boot)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(np.median(ratios)), float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=8, help="env copies of the training runs (--update: the preset's)")
    ap.add_argument("--steps", type=int, default=128 * 8 * 3 * 10, help="agent-steps per measurement")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--checks", action="store_true", help="also every mode with distribution checks on")
    ap.add_argument("--update", action="store_true",
                    help="only time PPO updates: SB3's train() with the checks off and on, and fast_train in one and two threads")
    ap.add_argument("--preset", choices=list(PRESETS), default="tutorial", help="--update's PPO settings and network")
    ap.add_argument("--out", type=Path, help="results file of the training runs (default: "
                    "experiments/results/update_modes_simple_spread_v3.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as bench_throughput.py: small MLPs run fastest on one thread per process
    if args.update:
        times = update_cost(args.preset, 5 * args.repeats)
        copies, n_steps, batch_size, n_epochs, hidden = PRESETS[args.preset]
        steps = n_epochs * -(-n_steps * copies * 3 // batch_size)
        print(f"simple_spread_v3 N=3, {args.preset}: {copies} copies, one update of {n_steps * copies * 3} agent-steps, "
              f"{steps} gradient steps of {batch_size}, {hidden} MLPs, {5 * args.repeats} interleaved repeats, load "
              f"average {os.getloadavg()[0]:.1f}")
        ratios: dict[str, dict[str, tuple[float, float, float]]] = {}
        for clock, by_variant in times.items():
            for name, t in by_variant.items():
                print(f"{clock:>4} {name:<24} {1e3 * statistics.median(t):>7.0f} ms per update (median) "
                      f"[{1e3 * min(t):.0f}, {1e3 * max(t):.0f}], {1e6 * statistics.median(t) / steps:.0f} us per gradient step")
            ratios[clock] = {f"{a} / {b}": paired_ratio(by_variant[a], by_variant[b]) for a, b in RATIOS}
            for name, (median, lo, hi) in ratios[clock].items():
                print(f"{clock:>4} {name}: {median:.2f}x [95% bootstrap CI {lo:.2f}, {hi:.2f}]")
        suffix = "" if args.preset == "tutorial" else f"_{args.preset}"
        out = Path(__file__).parent / "results" / f"update_cost_simple_spread_v3{suffix}.json"
        out.write_text(json.dumps({"settings": {"preset": args.preset, "copies": copies, "n_steps": n_steps,
                                                "batch_size": batch_size, "n_epochs": n_epochs, "hidden": hidden},
                                   "seconds_per_update": times,
                                   "paired_ratio": {clock: {k: {"median": m, "ci95": [lo, hi]} for k, (m, lo, hi) in r.items()}
                                                    for clock, r in ratios.items()},
                                   "load_average": os.getloadavg()[0]}, indent=2))
        print(f"wrote {out}")
        return
    rows: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for mode in available_modes():
            rows.setdefault(f"update_mode={mode}", []).append(madistill_run(args.copies, args.steps, 1, r, mode, "pettingzoo")[0])
            rows.setdefault(f"update_mode={mode}, critic thread off", []).append(
                madistill_run(args.copies, args.steps, 1, r, mode, "pettingzoo", critic_thread=False)[0])
            if args.checks:
                with distribution_checks_on():
                    rows.setdefault(f"update_mode={mode}, distribution checks on", []).append(
                        madistill_run(args.copies, args.steps, 1, r, mode, "pettingzoo")[0])
    print(f"simple_spread_v3 N=3, {args.copies} copies, 1 env worker, {args.steps} agent-steps per run, "
          f"{args.repeats} repeats")
    for name, sps in rows.items():
        print(f"{name:<46} {statistics.median(sps):>8.0f} agent-steps/s  [{min(sps):.0f}, {max(sps):.0f}]")
    out = args.out or Path(__file__).parent / "results" / "update_modes_simple_spread_v3.json"
    settings = {"copies": args.copies, "steps": args.steps, "workers": 1, "repeats": args.repeats, "ppo": PPO_SETTINGS,
                "hidden": HIDDEN, "env": ENV_KWARGS}
    out.write_text(json.dumps({"settings": settings, "agent_steps_per_s": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
