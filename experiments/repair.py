"""Gradient-masked repair of a saved teacher against full fine-tuning, last-layer fine-tuning and a random mask of
the same size, over several seeds (issue 22, items 4-5).

Each seed runs ``madistill repair`` on the teacher at the attack suite's middle budget (the seed changes the
clean episodes whose attacked observations form the failure set, and the random mask); every variant is then
evaluated on the same attack episodes (``attack.seed``), so per-episode returns are paired across variants.
Summarised over seeds: parameters changed, the clean return and the worst return over the attack suite per
variant, each variant's recovery of the worst case (its worst return minus the original's), the masked repair's
recovery as a share of full fine-tuning's, the masked-minus-random worst-case difference with a paired bootstrap
CI (episodes resampled within each seed), and the share of the original's clean gain over random each keeps.

    python experiments/repair.py /tmp/repair/sl_teacher --seeds 0 1 2 attack.episodes=20

With several teachers (independently trained, same env), teacher i is repaired with seed i (``--seeds``, default
0 .. n-1): the seeds are then training seeds as well, and each seed's variants are compared with its own original.

With ``--cascade`` (issue 22, item 6), each seed also runs the cascade monitor (``madistill cascade``) on the
original and the repaired policy together, on the same episodes, under the repair's attack (``fault=attack``,
its method and eps) on one agent of the repaired group (``--victim``, default its first): the cascade size (how
many non-faulted agents fail) and the non-faulted agents' return delta (faulted minus clean twin) of each, so
whether the downstream failures shrink after the repair.

Extra arguments are config overrides for every repair run (``attack.*``, ``repair.*``); ``repair.refresh=10``
repairs every variant adversarially (docs/repair.md, step 8), and ``experiments/repair_compare.py`` pairs such a
run with a fixed-set one on the same episodes. Writes
``experiments/results/repair_<env>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from madistill.cli import compose_config
from madistill.common.io import atomic_write_text
from madistill.evaluate.stats import bootstrap_ci
from madistill.policies.store import find_policy_dir, load_team, read_manifest
from madistill.stages import cascade as cascade_stage
from madistill.stages import repair as repair_stage
from madistill.stages.policies import teacher_dir

RESULTS = Path(__file__).parent / "results"


def _ci(diffs: np.ndarray, strata: np.ndarray) -> list[float]:
    return [float(v) for v in bootstrap_ci(diffs, np.mean, n_boot=2000, seed=0, strata=strata)]


def _ratio_ci(num: np.ndarray, den: np.ndarray, strata: np.ndarray) -> list[float]:
    """95% CI of mean(num) / mean(den) over paired episodes (resampled together, within seeds)."""
    def ratio(i: np.ndarray) -> float:
        i = i.astype(int)
        return float(num[i].mean() / den[i].mean())

    return [float(v) for v in bootstrap_ci(np.arange(len(num), dtype=float), ratio, n_boot=2000, seed=0, strata=strata)]


CASCADE_KEYS = ("size_mean", "size_ci", "others_return_delta", "others_return_delta_ci", "agents")


def cascade_comparison(env: str, original: Path, repair_run: Path, payload: dict, victim: str | None, seed: int,
                       overrides: list[str]) -> dict:
    """The cascade monitor on the original and the repaired policy, the same episodes, under the repair's attack on
    ``victim`` (default: the repaired group's first agent) from the fault's onset to the episode's end:
    ``{"victim", "original": {...}, "repaired": {...}}`` with each one's cascade size and non-faulted agents'
    return delta (means and CIs over episodes)."""
    group = payload["meta"]["group"]
    agents = next(g.agents for g in load_team(original)[0].groups if g.name == group)
    victim = victim or agents[0]
    rc = payload["meta"]["repair"]
    eps = payload["meta"]["eps"]
    # the monitor compares the policies of a sweep directory (``*/policies/*``) on the same episodes: one of
    # links to the original and the repaired policy, so its labels say which is which
    both = repair_run / "cascade_policies"
    for name, pdir in (("original", original), ("repaired", find_policy_dir(repair_run))):
        (both / name / "policies").mkdir(parents=True, exist_ok=True)
        (both / name / "policies" / pdir.name).symlink_to(Path(pdir).resolve(), target_is_directory=True)
    cfg = compose_config([f"env={env}", "logger=quiet", f"cascade.policy={both}",
                          "fault=attack", f"fault.method={rc['attack']}", f"fault.eps={eps}", f"fault.victims=[{victim}]",
                          f"seed={seed}", *overrides])
    res = cascade_stage.run(cfg, repair_run / "cascade")
    orig, rep = (next(iter(res["policies"][f"{Path(original).name}@{name}"]["faults"].values()))["cascade"]
                 for name in ("original", "repaired"))
    return {"victim": victim, **{name: {k: c[k] for k in CASCADE_KEYS} for name, c in (("original", orig), ("repaired", rep))}}


def summarise(runs: dict[int, dict]) -> dict:
    """Per variant over the seeds' repair reports: means of parameters changed, clean and worst return, recovery;
    paired CIs of masked minus each baseline on the worst-case per-episode returns; the masked repair's recovery
    as a share of full fine-tuning's and each variant's share of the original's clean gain over random, with
    CIs over the same paired episodes."""
    seeds = sorted(runs)
    names = ["original", *runs[seeds[0]]["variants"]]

    def ev(seed: int, name: str) -> dict:
        r = runs[seed]
        return r["original"]["evaluation"] if name == "original" else r["variants"][name]["evaluation"]

    def episodes(name: str, key: str) -> np.ndarray:
        return np.concatenate([ev(s, name)[key] for s in seeds])

    strata = np.concatenate([[s] * len(ev(s, "original")["worst_episodes"]) for s in seeds])
    random = np.concatenate([[ev(s, "original")["random"]] * len(ev(s, "original")["clean_episodes"]) for s in seeds])
    original_gain = episodes("original", "clean_episodes") - random
    out: dict = {"seeds": seeds, "variants": {}}
    for name in names:
        worst = [ev(s, name)["worst"] for s in seeds]
        clean = [ev(s, name)["clean"] for s in seeds]
        gain = episodes(name, "clean_episodes") - random
        row = {"clean": float(np.mean(clean)), "worst": float(np.mean(worst)),
               "recovery": float(np.mean([ev(s, name)["worst"] - ev(s, "original")["worst"] for s in seeds])),
               # pooled over the paired episodes of all seeds, as its CI resamples them
               "clean_gain_kept": float(gain.mean() / original_gain.mean()),
               "worst_attacks": [ev(s, name)["worst_attack"] for s in seeds]}
        if name != "original":
            row["learning_rates"] = [runs[s]["variants"][name]["learning_rate"] for s in seeds]
            row["anchors"] = [runs[s]["variants"][name]["anchor"] for s in seeds]
            row["within_divergence_bound"] = [runs[s]["variants"][name]["within_divergence_bound"] for s in seeds]
            row["changed"] = float(np.mean([runs[s]["variants"][name]["changed"] for s in seeds]))
            row["changed_share"] = float(np.mean([runs[s]["variants"][name]["changed_share"] for s in seeds]))
        out["variants"][name] = row
    worst = episodes("original", "worst_episodes")
    if "full" in out["variants"]:
        num, den = episodes("masked", "worst_episodes") - worst, episodes("full", "worst_episodes") - worst
        out["masked_recovery_of_full"] = {"mean": float(num.mean() / den.mean()), "ci95": _ratio_ci(num, den, strata)}
    out["clean_gain_kept_ci95"] = {name: _ratio_ci(episodes(name, "clean_episodes") - random, original_gain, strata)
                                   for name in names if name != "original"}
    out["paired_worst_masked_minus"] = {}
    for name in names:
        if name == "masked":
            continue
        d = np.concatenate([np.subtract(ev(s, "masked")["worst_episodes"], ev(s, name)["worst_episodes"]) for s in seeds])
        out["paired_worst_masked_minus"][name] = {"mean": float(d.mean()), "ci95": _ci(d, strata)}
    out["ablation"] = {s: runs[s]["ablation"] for s in seeds}
    if all("cascade" in runs[s] for s in seeds):
        out["cascade"] = {name: {k: float(np.mean([runs[s]["cascade"][name][k] for s in seeds]))
                                 for k in ("size_mean", "others_return_delta")} for name in ("original", "repaired")}
        out["cascade"]["victim"] = runs[seeds[0]]["cascade"]["victim"]
        out["cascade"]["seeds"] = {s: {name: runs[s]["cascade"][name] for name in ("original", "repaired")} for s in seeds}
    return out


def markdown(summary: dict, env: str, command: str) -> str:
    lines = [f"# Masked repair vs baselines on {env}", "", f"`{command}`", "",
             "| variant | learning rate @ anchor per seed | params changed | share | clean | worst attacked | recovery | "
             "clean gain kept [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    for name, v in summary["variants"].items():
        rates = ", ".join(f"{r:g} @ {a:g}" + ("" if ok else " (none within the bound)") for r, a, ok in
                          zip(v.get("learning_rates", []), v.get("anchors", []), v.get("within_divergence_bound", []))) or "-"
        ci = summary["clean_gain_kept_ci95"].get(name)
        kept = f"{v['clean_gain_kept']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        lines.append(f"| {name} | {rates} | {v.get('changed', 0):.0f} | {v.get('changed_share', 0):.4f} | {v['clean']:.2f} | "
                     f"{v['worst']:.2f} | {v['recovery']:.2f} | {kept} |")
    share = summary.get("masked_recovery_of_full")
    if share:
        lost = summary["variants"]["full"]["recovery"] <= 0
        lines += ["", f"Masked recovery / full recovery of the worst case: {share['mean']:.3f} "
                  f"[{share['ci95'][0]:.3f}, {share['ci95'][1]:.3f}]"
                  + (" (full fine-tuning lowers the worst case, so this is not a share of a recovery)" if lost else "")]
    lines += ["", "| masked minus | worst-case mean | 95% paired CI |", "|---|---|---|"]
    for name, d in summary["paired_worst_masked_minus"].items():
        lines.append(f"| {name} | {d['mean']:.2f} | [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}] |")
    if "cascade" in summary:
        c = summary["cascade"]
        lines += ["", f"Cascade under the repair's attack on {c['victim']} (means over seeds of the per-seed means over "
                  "episodes):", "", "| policy | cascade size | non-faulted agents' return delta |", "|---|---|---|"]
        lines += [f"| {name} | {c[name]['size_mean']:.3f} | {c[name]['others_return_delta']:+.3f} |"
                  for name in ("original", "repaired")]
        lines += ["", "Per seed (95% CIs over episodes; fail rate: share of episodes in which each non-faulted agent "
                  "fails):", "", "| seed | policy | cascade size | non-faulted agents' return delta | fail rate per agent |",
                  "|---|---|---|---|---|"]
        for seed, per in c["seeds"].items():
            for name in ("original", "repaired"):
                p = per[name]
                rates = ", ".join(f"{a} {v['fail_rate']:.2f}" for a, v in p["agents"].items())
                lines.append(f"| {seed} | {name} | {p['size_mean']:.2f} [{p['size_ci'][0]:.2f}, {p['size_ci'][1]:.2f}] | "
                             f"{p['others_return_delta']:+.2f} [{p['others_return_delta_ci'][0]:+.2f}, "
                             f"{p['others_return_delta_ci'][1]:+.2f}] | {rates} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teachers", nargs="+", help="teacher run or policy directory; several: one per seed, in order")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="repair seeds (default: 0 1 2 for one teacher, 0 .. n-1 for n teachers)")
    ap.add_argument("--name", default=None, help="results file suffix (default: the env id)")
    ap.add_argument("--cascade", action="store_true", help="also compare the cascades of original and repaired policy")
    ap.add_argument("--victim", default=None, help="the faulted agent of --cascade (default: the repaired group's first)")
    ap.add_argument("--keep", default=None, help="directory keeping each seed's repair run (default: a temporary one)")
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]  # config overrides, anywhere
    args = ap.parse_args([a for a in sys.argv[1:] if a not in overrides])
    seeds = args.seeds if args.seeds is not None else list(range(3 if len(args.teachers) == 1 else len(args.teachers)))
    if len(args.teachers) > 1 and len(seeds) != len(args.teachers):
        ap.error(f"{len(args.teachers)} teachers need as many --seeds (one each), got {len(seeds)}")
    tdirs = [teacher_dir(t) for t in (args.teachers if len(args.teachers) > 1 else args.teachers * len(seeds))]
    envs = {read_manifest(t)["env"]["name"] for t in tdirs}
    if len(envs) > 1:
        ap.error(f"the teachers act in different envs {sorted(envs)}: run one env at a time")
    env = envs.pop()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="repair_exp_") as scratch:
        tmp = args.keep or scratch
        for seed, tdir in zip(seeds, tdirs):
            cfg = compose_config([f"env={env}", "logger=quiet", f"repair.policy={tdir}", f"seed={seed}", *overrides])
            runs[seed] = repair_stage.run(cfg, Path(tmp) / f"s{seed}")
            if args.cascade:
                runs[seed]["cascade"] = cascade_comparison(env, tdir, Path(tmp) / f"s{seed}", runs[seed], args.victim,
                                                           seed, overrides)
            print(f"seed {seed}: " + ", ".join(f"{n} worst {v['evaluation']['worst']:.2f}"
                                               for n, v in runs[seed]["variants"].items()), flush=True)
            text = write_results(runs, env, args.name or env)  # after every seed, so a stopped run keeps its seeds
    print(text)


def write_results(runs: dict[int, dict], env: str, name: str) -> str:
    """Summarise the seeds run so far into ``experiments/results/repair_<name>.{json,md}``; returns the markdown."""
    summary = summarise(runs)
    command = "python experiments/repair.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    stem = f"repair_{name}"  # not a Path's with_suffix: a name like eps0.2 would lose its ".2"
    text = markdown(summary, env, command)
    atomic_write_text(RESULTS / f"{stem}.json", json.dumps({"command": command, "summary": summary, "runs": runs}, indent=2))
    atomic_write_text(RESULTS / f"{stem}.md", text)
    return text


if __name__ == "__main__":
    main()
