"""Paired comparison of two ``experiments/repair.py`` results on the same teachers, seeds and attack episodes, e.g.
the adversarial repair (``repair.refresh=10``) against the fixed failure set (``repair.refresh=0``): per variant,
the second minus the first on the worst attacked and on the clean return, per episode, with 95% bootstrap CIs
(episodes resampled within seeds, as ``experiments/repair.py`` does).

    python experiments/repair_compare.py experiments/results/repair_simple_spread_v3_eps0.2_fixed.json \\
        experiments/results/repair_simple_spread_v3_eps0.2_adv.json --name simple_spread_v3_eps0.2_adv_vs_fixed

The two runs pair up only if they played the same episodes: the originals' per-episode returns must be equal
(same teachers, seeds and ``attack.*``), else the script stops. Writes
``experiments/results/repair_<--name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# the experiment's paired CI, one definition (run as a script, this folder is on the path)
from repair import RESULTS, _ci

from madistill.common.io import atomic_write_text


def compare(first: dict, second: dict) -> dict:
    """Per variant of both results, ``second - first`` on the worst attacked and the clean per-episode returns:
    ``{variant: {"worst": {"mean", "ci95"}, "clean": {...}}}``, pooled over the seeds both ran."""
    seeds = sorted(set(first["runs"]) & set(second["runs"]), key=int)
    if not seeds:
        raise SystemExit("the two results share no seed")
    for s in seeds:
        a, b = (r["runs"][s]["original"]["evaluation"] for r in (first, second))
        if a["worst_episodes"] != b["worst_episodes"] or a["clean_episodes"] != b["clean_episodes"]:
            raise SystemExit(f"seed {s}: the originals' episode returns differ, so the runs did not play the same "
                             "episodes (teachers, seeds or attack.* differ)")
    strata = np.concatenate([[int(s)] * len(first["runs"][s]["original"]["evaluation"]["worst_episodes"]) for s in seeds])
    out: dict = {"seeds": [int(s) for s in seeds], "variants": {}}
    for name in first["runs"][seeds[0]]["variants"]:
        row = {}
        for key in ("worst", "clean"):
            d = np.concatenate([np.subtract(second["runs"][s]["variants"][name]["evaluation"][f"{key}_episodes"],
                                            first["runs"][s]["variants"][name]["evaluation"][f"{key}_episodes"])
                                for s in seeds])
            row[key] = {"mean": float(d.mean()), "ci95": _ci(d, strata)}
        out["variants"][name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", help="results JSON of experiments/repair.py (the reference)")
    ap.add_argument("second", help="results JSON of experiments/repair.py (compared with the first)")
    ap.add_argument("--name", required=True, help="results file suffix")
    args = ap.parse_args()
    first, second = (json.loads(Path(p).read_text()) for p in (args.first, args.second))
    result = compare(first, second)
    command = "python experiments/repair_compare.py " + " ".join(sys.argv[1:])
    lines = [f"# {Path(args.second).stem} minus {Path(args.first).stem}", "", f"`{command}`", "",
             f"Paired over the same episodes of seeds {result['seeds']} (95% bootstrap CIs, episodes resampled within "
             "seeds).", "", "| variant | worst attacked: second minus first [95% CI] | clean: second minus first [95% CI] |",
             "|---|---|---|"]
    for name, row in result["variants"].items():
        w, c = row["worst"], row["clean"]
        lines.append(f"| {name} | {w['mean']:+.2f} [{w['ci95'][0]:+.2f}, {w['ci95'][1]:+.2f}] | "
                     f"{c['mean']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(RESULTS / f"repair_{args.name}.json",
                      json.dumps({"command": command, "first": args.first, "second": args.second, **result}, indent=2))
    atomic_write_text(RESULTS / f"repair_{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
