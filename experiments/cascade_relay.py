"""Ground truth for the cascade monitor: on relay envs, whose influence lags are known (``influence_lags()``), the
influence matrix of trained teachers should find every reachable pair at its shortest-path lag and nothing else.

For each topology (chain, star, a custom edge list) and seed, trains a relay teacher (``madistill train``), runs
``madistill cascade`` on it and scores its ``first_lag`` against the env's ``influence_lags()``: precision and
recall of the pairs found, and the share of true pairs whose first lag is exact. Writes
``experiments/results/cascade_relay.json``.

    python experiments/cascade_relay.py [--seeds 0 1 2] [--steps 50000] [--episodes 20] [--out /tmp/cascade_relay]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from envs.relay import RelayEnv
from madistill.cascade.measures import precision_recall

TOPOLOGIES = {
    "chain": {"n_agents": 4, "topology": "chain"},
    "star": {"n_agents": 4, "topology": "star"},
    "edges": {"n_agents": 5, "topology": "edges", "edges": [[0, 1], [0, 2], [2, 3], [3, 1]]},
}


def overrides(kwargs: dict) -> list[str]:
    """Command-line overrides that set the relay env's kwargs (`++`: whether or not conf/env/relay.yaml has the key)."""
    return [f"++env.kwargs.{k}={json.dumps(v).replace(' ', '')}" for k, v in kwargs.items()]


def madistill(*args: str) -> None:
    """Run one madistill stage in a fresh process (Hydra keeps global state), failing loudly."""
    subprocess.run([sys.executable, "-m", "madistill", *args, "logger=quiet", "env.num_workers=0"], check=True,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=50_000, help="teacher.total_agent_steps")
    ap.add_argument("--episodes", type=int, default=20, help="cascade.episodes")
    ap.add_argument("--out", default="/tmp/cascade_relay", help="where the runs go")
    ap.add_argument("--results", default="experiments/results/cascade_relay.json")
    args = ap.parse_args()
    rows = []
    for name, kwargs in TOPOLOGIES.items():
        truth = RelayEnv(**kwargs).influence_lags()
        for seed in args.seeds:
            run, study = Path(args.out, name, f"s{seed}"), Path(args.out, name, f"s{seed}_cascade")
            env = ["env=relay", *overrides(kwargs), f"seed={seed}"]
            madistill("train", *env, f"teacher.total_agent_steps={args.steps}", "env.num_envs=4",
                      "teacher.hidden_sizes=[32]", f"hydra.run.dir={run}")
            madistill("cascade", *env, f"cascade.policy={run}", f"cascade.episodes={args.episodes}",
                      "logger.figures=false", f"hydra.run.dir={study}")
            report = json.loads((study / "reports" / "cascade.json").read_text())
            score = precision_recall(report["first_lag"], {tuple(k): v for k, v in truth.items()})
            rows.append({"topology": name, "seed": seed, **score, "first_lag": report["first_lag"]})
            print(f"{name:<6} seed {seed}: precision {score['precision']:.2f} recall {score['recall']:.2f} "
                  f"exact lag {score['lag_exact']:.2f}")
    Path(args.results).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()
