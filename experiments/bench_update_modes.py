"""Teacher-training throughput of each ``teacher.update_mode``, and of PPO's distribution checks, side by side.

Trains teachers on simple_spread_v3 (8 copies, the settings of ``bench_throughput.py``) with every update mode
the installed madistill offers, one env worker, and with ``--checks`` each mode once more with torch's
distribution argument checks left on during the PPO update (its distributions then validate their arguments,
as SB3's do by default). Variants are interleaved per repeat so drifts in machine load hit them alike; starting
the env workers is not timed.

    python experiments/bench_update_modes.py [--steps 30720] [--repeats 2] [--checks]
    python experiments/bench_update_modes.py --update [--repeats 2]   # PPO updates alone, checks off and on

Writes ``experiments/results/update_modes_simple_spread_v3.json`` (agent-steps/s per variant and repeat), with
``--update`` ``update_cost_simple_spread_v3.json`` (seconds per update).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_throughput import ENV_KWARGS, HIDDEN, PPO_SETTINGS, madistill_run  # noqa: E402


def available_modes() -> list[str]:
    """The update modes the installed madistill accepts."""
    from madistill import teacher

    return list(teacher.UPDATE_MODES)


@contextmanager
def distribution_checks_on() -> Iterator[None]:
    """Keep torch's default distribution validation on for the whole run, whatever the update asks for."""
    with mock.patch.object(torch.distributions.Distribution, "set_default_validate_args", lambda value: None):
        yield


def update_cost(copies: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per PPO update (``train()`` alone) of one spread group on a rollout of ``copies`` copies, with
    torch's distribution checks off (as the trainer runs it) and on, interleaved ``repeats`` times."""
    from madistill.envs import EnvSpec, group_agents, make_env
    from madistill.teacher import build_model

    env = make_env(EnvSpec("mpe2.simple_spread_v3.parallel_env", ENV_KWARGS))
    (group,) = group_agents(env)
    env.close()
    arch = {"hidden_sizes": HIDDEN, "activation": "tanh", "team_state_dim": 0}
    model = build_model(group, copies, arch, dict(PPO_SETTINGS), 0, "cpu")
    buf, rng = model.rollout_buffer, np.random.default_rng(0)
    buf.observations[:] = rng.normal(size=buf.observations.shape)
    buf.actions[:] = rng.integers(0, group.action_space.n, size=buf.actions.shape)
    buf.advantages[:] = rng.normal(size=buf.advantages.shape)
    buf.valid[:], buf.full = True, True
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, context in (("checks off", nullcontext), ("checks on", distribution_checks_on)):
            with context():
                t = time.perf_counter()
                model.train()
                times.setdefault(name, []).append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--steps", type=int, default=128 * 8 * 3 * 10, help="agent-steps per measurement")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--checks", action="store_true", help="also every mode with distribution checks on")
    ap.add_argument("--update", action="store_true", help="only time PPO updates with the checks off and on")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as bench_throughput.py: small MLPs run fastest on one thread per process
    if args.update:
        times = update_cost(args.copies, 5 * args.repeats)
        for name, t in times.items():
            print(f"PPO update, distribution {name}: {1e3 * statistics.median(t):.0f} ms (median of {len(t)}) "
                  f"[{1e3 * min(t):.0f}, {1e3 * max(t):.0f}]")
        out = Path(__file__).parent / "results" / "update_cost_simple_spread_v3.json"
        out.write_text(json.dumps({"settings": {"copies": args.copies, "ppo": PPO_SETTINGS, "hidden": HIDDEN},
                                   "seconds_per_update": times}, indent=2))
        print(f"wrote {out}")
        return
    rows: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for mode in available_modes():
            rows.setdefault(f"update_mode={mode}", []).append(madistill_run(args.copies, args.steps, 1, r, mode, "pettingzoo")[0])
            if args.checks:
                with distribution_checks_on():
                    rows.setdefault(f"update_mode={mode}, distribution checks on", []).append(
                        madistill_run(args.copies, args.steps, 1, r, mode, "pettingzoo")[0])
    print(f"simple_spread_v3 N=3, {args.copies} copies, 1 env worker, {args.steps} agent-steps per run, "
          f"{args.repeats} repeats")
    for name, sps in rows.items():
        print(f"{name:<46} {statistics.median(sps):>8.0f} agent-steps/s  [{min(sps):.0f}, {max(sps):.0f}]")
    out = Path(__file__).parent / "results" / "update_modes_simple_spread_v3.json"
    settings = {"copies": args.copies, "steps": args.steps, "workers": 1, "repeats": args.repeats, "ppo": PPO_SETTINGS,
                "hidden": HIDDEN, "env": ENV_KWARGS}
    out.write_text(json.dumps({"settings": settings, "agent_steps_per_s": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
