"""Why the fast update's head passes are compiled: the actor's pass of one minibatch, run from Python through the
policy's modules or as the compiled call ``fast_train`` uses (madistill/ppo_losses.py), timed alone and while a
second thread runs the critic's pass over and over, from Python or compiled. Run from Python, each of a pass's small
operations takes the GIL back from the other thread.

    python experiments/bench_gil_contention.py [--repeats 5] [--calls 1000]

Spread (N=3), the tutorial recipe's network and minibatch of 256 (experiments/bench_throughput.py), one torch
thread per thread. Prints the median microseconds per actor pass of each setting over ``--repeats`` interleaved
repeats of ``--calls`` passes, and writes ``experiments/results/gil_contention.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_throughput import PPO_SETTINGS  # noqa: E402
from bench_update_modes import filled_model  # noqa: E402

from madistill import ppo_losses, sb3_adapter  # noqa: E402


def _looping(fn: Callable[[], object], stop: threading.Event) -> None:
    torch.set_num_threads(1)
    with torch.jit.optimized_execution(False):
        while not stop.is_set():
            fn()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=1000, help="actor passes per timing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = filled_model("tutorial")
    buf = model.rollout_buffer
    buf.prepare()
    policy = model.policy
    policy.set_training_mode(True)
    batch = sb3_adapter._minibatch(model, torch.arange(PPO_SETTINGS["batch_size"]))
    act, criticize = sb3_adapter._compiled_passes(model, PPO_SETTINGS["clip_range"], None)

    def python_actor() -> None:  # the actor's pass through the policy's modules
        out = policy.action_net(policy.mlp_extractor.forward_actor(batch.features))
        ppo_losses.actor_losses(out, None, batch.data.actions, batch.data.old_log_prob, batch.advantages,
                                PPO_SETTINGS["clip_range"], model.ent_coef, None)[0].backward()

    def python_critic() -> None:  # the critic's pass through the policy's modules
        values = policy.value_net(policy.mlp_extractor.forward_critic(batch.features)).flatten()
        (model.vf_coef * ppo_losses.value_loss(values, batch.data.old_values, batch.data.returns, None)).backward()

    actors = {"actor from Python": python_actor, "compiled actor": lambda: act(batch)}
    critics: dict[str, Callable[[], object] | None] = {
        "alone": None, "beside the critic from Python": python_critic,
        "beside the compiled critic": lambda: criticize(batch, None)}
    times: dict[str, list[float]] = {f"{a}, {c}": [] for a in actors for c in critics}
    with torch.jit.optimized_execution(False):
        for _ in range(50):  # warm up every pass
            for fn in (python_actor, python_critic, lambda: act(batch), lambda: criticize(batch, None)):
                fn()
        for _ in range(args.repeats):
            for (a, actor), (c, critic) in ((x, y) for x in actors.items() for y in critics.items()):
                stop = threading.Event()
                thread = threading.Thread(target=_looping, args=(critic, stop)) if critic else None
                if thread:
                    thread.start()
                    time.sleep(0.01)
                t = time.perf_counter()
                for _ in range(args.calls):
                    actor()
                times[f"{a}, {c}"].append((time.perf_counter() - t) / args.calls)
                stop.set()
                if thread:
                    thread.join()
    print(f"actor's pass of a minibatch of {PPO_SETTINGS['batch_size']} (tutorial network), median of {args.repeats} "
          f"interleaved repeats of {args.calls} passes, load average {os.getloadavg()[0]:.1f}")
    for name, t in times.items():
        alone = statistics.median(times[name.split(", ")[0] + ", alone"])
        print(f"{name:<52} {1e6 * statistics.median(t):>6.0f} us  ({statistics.median(t) / alone:.2f}x alone)")
    out = Path(__file__).parent / "results" / "gil_contention.json"
    out.write_text(json.dumps({"settings": vars(args), "seconds_per_actor_pass": times,
                               "load_average": os.getloadavg()[0]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
