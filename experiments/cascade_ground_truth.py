"""Ground truth for the cascade monitor: where the influence lags are known, the influence matrix of trained
teachers should find every reachable pair at its shortest-path lag and nothing else.

Cases: relay envs (``chain``, ``star``, a custom edge list ``edges``), whose lags are ``influence_lags()``, and
``speaker_listener`` (simple_speaker_listener_v4): the listener hears the speaker's message of the step before
(lag 1), and nothing the listener does reaches the speaker (its effect must be exactly 0 at every lag). For each
case and seed, trains a teacher (``madistill train``), runs ``madistill cascade`` on it and scores its
``first_lag``: precision and recall of the pairs found, the share of true pairs whose first lag is exact, and the
largest effect on any pair the truth leaves unreachable. Writes ``experiments/results/cascade_relay.json`` for the
relay cases, ``cascade_<cases>.json`` otherwise.

    python experiments/cascade_ground_truth.py [--cases chain star edges] [--seeds 0 1 2] [--steps 50000]
    python experiments/cascade_ground_truth.py --cases speaker_listener --steps 100000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from envs.relay import RelayEnv
from madistill.cascade.measures import precision_recall

RELAY = {
    "chain": {"n_agents": 4, "topology": "chain"},
    "star": {"n_agents": 4, "topology": "star"},
    "edges": {"n_agents": 5, "topology": "edges", "edges": [[0, 1], [0, 2], [2, 3], [3, 1]]},
}


def case(name: str) -> tuple[list[str], dict[tuple[str, str], int]]:
    """A case's env overrides and its true influence lags."""
    if name == "speaker_listener":
        return ["env=simple_speaker_listener_v4"], {("speaker_0", "listener_0"): 1}
    return ["env=relay", *overrides(RELAY[name])], RelayEnv(**RELAY[name]).influence_lags()


def overrides(kwargs: dict) -> list[str]:
    """Command-line overrides that set the relay env's kwargs (`++`: whether or not conf/env/relay.yaml has the key)."""
    return [f"++env.kwargs.{k}={json.dumps(v).replace(' ', '')}" for k, v in kwargs.items()]


def madistill(*args: str) -> None:
    """Run one madistill stage in a fresh process (Hydra keeps global state), failing loudly."""
    subprocess.run([sys.executable, "-m", "madistill", *args, "logger=quiet", "env.num_workers=0"], check=True,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(RELAY), choices=[*RELAY, "speaker_listener"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=50_000, help="teacher.total_agent_steps")
    ap.add_argument("--episodes", type=int, default=20, help="cascade.episodes")
    ap.add_argument("--out", default="/tmp/cascade_ground_truth", help="where the runs go")
    ap.add_argument("--results", default=None, help="default: experiments/results/cascade_relay.json or cascade_<cases>.json")
    args = ap.parse_args()
    tag = "relay" if set(args.cases) <= set(RELAY) else "_".join(args.cases)
    args.results = args.results or f"experiments/results/cascade_{tag}.json"
    rows = []
    for name in args.cases:
        env_args, truth = case(name)
        for seed in args.seeds:
            run, study = Path(args.out, name, f"s{seed}"), Path(args.out, name, f"s{seed}_cascade")
            env = [*env_args, f"seed={seed}"]
            madistill("train", *env, f"teacher.total_agent_steps={args.steps}", "env.num_envs=4",
                      "teacher.hidden_sizes=[32]", f"hydra.run.dir={run}")
            madistill("cascade", *env, f"cascade.policy={run}", f"cascade.episodes={args.episodes}",
                      "logger.figures=false", f"hydra.run.dir={study}")
            report = json.loads((study / "reports" / "cascade.json").read_text())
            score = precision_recall(report["first_lag"], truth)
            unreachable = max((max((e for e in effects if e is not None), default=0.0)  # null: lag past the end
                               for s, row in report["influence"].items() for d, effects in row.items()
                               if (s, d) not in truth), default=0.0)
            rows.append({"case": name, "seed": seed, **score, "max_unreachable_effect": unreachable,
                         "first_lag": report["first_lag"]})
            print(f"{name:<6} seed {seed}: precision {score['precision']:.2f} recall {score['recall']:.2f} "
                  f"exact lag {score['lag_exact']:.2f} largest effect on an unreachable pair {unreachable:g}")
    Path(args.results).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()
