"""Which forcing PGD reaches its targets: every (observation, target action) pair of a policy's clean greedy
episodes, forced by PGD variants side by side, with the share of pairs each one makes greedy and its time.

    python experiments/force_variants.py runs/zoo/sl/s0 --name sl_s0

Per policy (``teacher``, ``student`` of the run), group and eps, the observations of ``--episodes`` clean greedy
episodes (seeds 20000..) and every action other than the greedy one as a target: the pairs the lookahead
attack forces. The variants, all with the attack config's steps and restarts (10 and 3) unless named:

- ``old``: signed steps of 2.5 eps / steps, each restart's end point, judged by log pi(target) alone (the forcing
  before best-iterate);
- ``end_logp``: the same, a point where the target is greedy preferred to any other;
- ``best_logp``: the same steps, the best iterate over all steps (reached first, then log pi(target));
- ``best_margin``: the best iterate, steps on the margin (target logit minus the best other logit);
- ``halve_margin``: the margin, each step from the sample's best point, the step halved whenever it does not
  improve that point (the first step eps);
- ``cosine_margin``: the margin, steps decaying from 2 x 2.5 eps / steps to 0 along a half cosine;
- ``*_logp``: the same on log pi(target);
- ``*_early``: the same, a sample left alone once it reached its target (restarts only for the others);
- ``halve_logp_early_small``: ``halve_logp_early`` with a first step of 2.5 eps / steps;
- ``library``: ``Attack.force`` as the library has it now (``halve_logp_early``, each step along the gradient at
  the best point rather than at the last one);
- ``reference``: ``halve_margin`` with 100 steps and 10 restarts, the reachable pairs as far as we can tell.

Reached pairs are counted by the policy's greedy action at the returned point. The same for untargeted PGD on
KL (``end``: the former PGD; ``best``: best iterate; ``halve``: best iterate and halving, as the library now
has it; ``halve_small``: first step 2.5 eps / steps; ``cosine``): the share of observations whose greedy action
moved. Times are the median of ``--repeats`` interleaved runs, one thread. Writes
``experiments/results/force_variants_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from madistill.attacks.budget import Budget, group_budgets
from madistill.attacks.methods import Attack
from madistill.common.collect import collect_round
from madistill.config import EnvConfig
from madistill.envs.factory import EnvSpec
from madistill.envs.features import feature_layouts
from madistill.policies.base import Policy
from madistill.policies.store import find_policy_dir, load_team, read_manifest
from madistill.runtime import make_vec_env, seed_everything

RESULTS = Path(__file__).parent / "results"
Force = Callable[[Policy, torch.Tensor, torch.Tensor, Budget, torch.Generator], torch.Tensor]


def _score(policy: Policy, x: torch.Tensor, target: torch.Tensor, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the objective (log pi(target) or the margin) and whether the target is the greedy action."""
    z = policy(x)
    if objective == "kl":  # target: the clean log-probabilities; reached: the greedy action moved
        logp = torch.log_softmax(z, -1)
        return (target.exp() * (target - logp)).sum(-1), z.argmax(-1) != target.argmax(-1)
    zt = z.gather(1, target[:, None])[:, 0]
    other = z.scatter(1, target[:, None], float("-inf")).amax(1)
    value = zt - other if objective == "margin" else torch.log_softmax(z, -1).gather(1, target[:, None])[:, 0]
    return value, zt > other


def _grad(policy: Policy, x: torch.Tensor, target: torch.Tensor, objective: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value, reached = _score(policy, x, target, objective)
        (g,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), reached, g


def variant(objective: str, best: bool, schedule: str, early: bool, steps: int = 10, restarts: int = 3,
            alpha0: float = 1.0, reached_first: bool = True) -> Force:
    """One forcing PGD of the side-by-side (see the module docstring)."""
    # a reached target first, then by value; untargeted PGD compares values only, as the library does
    bonus = 1e6 if reached_first and objective != "kl" else 0.0

    def force(policy: Policy, x: torch.Tensor, target: torch.Tensor, budget: Budget, gen: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            v0, r0 = _score(policy, x, target, objective)
        out, key = x.clone(), torch.where(r0, v0 + bonus, v0)
        for _ in range(restarts):
            rows = (key < 1e5).nonzero()[:, 0] if early else torch.arange(len(x))  # early: always reached first
            if not len(rows):
                break
            xr, tr, radius = x[rows], target[rows], budget.radius
            cur = budget.sample(xr, gen)
            alpha = torch.full((len(rows), 1), 2.5 / steps) if schedule != "halve" else torch.full((len(rows), 1), alpha0)
            best_x, best_k = cur.clone(), torch.full((len(rows),), float("-inf"))
            live = torch.ones(len(rows), dtype=torch.bool)
            for t in range(steps + 1):
                idx = live.nonzero()[:, 0]
                v, r, g = _grad(policy, cur[idx], tr[idx], objective)
                k = torch.where(r, v + bonus, v)
                better = k > best_k[idx]
                if best or t == steps:
                    best_x[idx] = torch.where(better[:, None], cur[idx], best_x[idx])
                    best_k[idx] = torch.where(better, k, best_k[idx])
                if not best and t == steps:
                    best_x[idx], best_k[idx] = cur[idx], k
                if t == steps:
                    break
                if early:
                    live[idx[r]] = False
                    idx, g = idx[~r], g[~r]
                if schedule == "halve":
                    alpha[idx[~better[~r] if early else ~better]] /= 2
                    base = best_x[idx]
                elif schedule == "cosine":
                    base = cur[idx]
                    alpha[idx] = 2.5 / steps * (1 + torch.cos(torch.tensor(torch.pi * t / steps))).item()
                else:
                    base = cur[idx]
                cur[idx] = budget.project(base + alpha[idx] * radius * g.sign(), xr[idx])
            win = best_k > key[rows]
            out[rows] = torch.where(win[:, None], best_x, out[rows])
            key[rows] = torch.where(win, best_k, key[rows])
        return out

    return force


def library(policy: Policy, x: torch.Tensor, target: torch.Tensor, budget: Budget, gen: torch.Generator) -> torch.Tensor:
    return Attack("targeted", "target").force(policy, x, target, budget, gen)


VARIANTS: dict[str, Force] = {
    "old": variant("logp", False, "const", False, reached_first=False),
    "end_logp": variant("logp", False, "const", False),
    **{f"{schedule}_{objective}{'_early' * early}": variant(objective, True, schedule.replace("best", "const"), early)
       for schedule in ("best", "halve", "cosine") for objective in ("logp", "margin") for early in (False, True)},
    "halve_logp_early_small": variant("logp", True, "halve", True, alpha0=0.25),
    "library": library,
    "reference": variant("margin", True, "halve", False, steps=100, restarts=10),
}
# untargeted PGD on KL(pi(x) || pi(x + delta)): reached = the greedy action moved
KL_VARIANTS: dict[str, Force] = {
    "end": variant("kl", False, "const", False),
    "best": variant("kl", True, "const", False),
    "halve": variant("kl", True, "halve", False),
    "halve_small": variant("kl", True, "halve", False, alpha0=0.25),
    "cosine": variant("kl", True, "cosine", False),
}


def side_by_side(forces: dict[str, Force], policy: Policy, xs: torch.Tensor, ts: torch.Tensor, budget: Budget,
                 repeats: int, objective: str) -> dict[str, dict[str, float]]:
    """Per variant: the share of rows reached at its returned point, the mean objective there and the median seconds
    of ``repeats`` interleaved runs (seeds 0..; ``reference`` runs once)."""
    times: dict[str, list[float]] = {v: [] for v in forces}
    out: dict[str, dict[str, float]] = {}
    for rep in range(repeats):
        for v, force in forces.items():
            if v == "reference" and rep:
                continue
            start = time.perf_counter()
            adv = force(policy, xs, ts, budget, torch.Generator().manual_seed(rep))
            times[v].append(time.perf_counter() - start)
            with torch.no_grad():
                value, reached = _score(policy, adv, ts, objective)
            out[v] = {"reached": float(reached.float().mean()), "objective": float(value.mean())}
    return {v: {**out[v], "seconds": statistics.median(times[v])} for v in forces}


def table(rows: list[dict], variants: list[str], what: str) -> list[str]:
    """Markdown: a row per variant, a column per policy, group and eps, then the pooled share and summed time."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["policy"], r["group"], r["eps"], r["rows"]), {})[r["variant"]] = r
    lines = ["| variant | " + " | ".join(f"{p} {g} eps {e:g} ({n} {what})" for p, g, e, n in cells)
             + f" | all {what} | seconds |", "|---|" + "---|" * (len(cells) + 2)]
    for v in variants:
        by = [c[v] for c in cells.values()]
        share = sum(r["reached"] * r["rows"] for r in by) / sum(r["rows"] for r in by)
        lines.append(f"| {v} | " + " | ".join(f"{100 * r['reached']:.1f}% ({r['seconds']:.2f} s)" for r in by)
                     + f" | {100 * share:.2f}% | {sum(r['seconds'] for r in by):.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a pipeline run directory (policies/teacher and policies/student)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.3, 1.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--kl-variants", nargs="*", default=list(KL_VARIANTS))
    args = ap.parse_args()
    seed = 20000
    seed_everything(seed, 1)
    rows: dict[str, list[dict]] = {"targeted": [], "kl": []}
    for name in ("teacher", "student"):
        pdir = find_policy_dir(str(Path(args.run) / "policies" / name))
        manifest = read_manifest(pdir)
        spec = EnvSpec.from_dict(manifest["env"])
        env_cfg = OmegaConf.merge(OmegaConf.structured(EnvConfig), manifest["config"].get("env", {}), {"num_workers": 0})
        with make_vec_env(env_cfg, spec) as venv:
            team, _ = load_team(pdir, venv.groups)
            raw, _ = collect_round(venv, team, seed, True, episodes=args.episodes)
            layouts = feature_layouts(venv.groups, {}, venv.feature_names)
        for g in team.groups:
            policy, n = team[g.name], int(g.action_space.n)  # type: ignore[attr-defined]
            x = team.normalizers[g.name].normalize(raw[g.name])
            with torch.no_grad():
                clean = torch.log_softmax(policy(x), -1)
            target = torch.arange(n).repeat_interleave(len(x))
            keep = target != clean.argmax(-1).repeat(n)
            tasks = {"targeted": ({v: VARIANTS[v] for v in args.variants}, x.repeat(n, 1)[keep], target[keep], "logp"),
                     "kl": ({v: KL_VARIANTS[v] for v in args.kl_variants}, x, clean, "kl")}
            for eps in args.eps:
                budget = group_budgets(eps, layouts)[g.name]
                for task, (forces, xs, ts, objective) in tasks.items():
                    for v, r in side_by_side(forces, policy, xs, ts, budget, args.repeats, objective).items():
                        rows[task].append({"policy": name, "group": g.name, "eps": eps, "rows": len(xs), "variant": v, **r})
                        print(task, json.dumps(rows[task][-1]), flush=True)
    command = " ".join(["python experiments/force_variants.py", *sys.argv[1:]])
    text = "\n".join([f"# Forcing PGD variants ({args.name})", "", f"    {command}", "",
                      "Share of (observation, target action) pairs whose target is the greedy action at the returned "
                      "point (median seconds):", "", *table(rows["targeted"], args.variants, "pairs"), "",
                      "Untargeted PGD on KL: share of observations whose greedy action moved (median seconds):", "",
                      *table(rows["kl"], args.kl_variants, "observations"), ""])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"force_variants_{args.name}.json").write_text(json.dumps({"command": command, **rows}, indent=2))
    (RESULTS / f"force_variants_{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
