"""``madistill repair``: localise the neurons behind an agent group's attack failures and fine-tune only them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from madistill.config import ConfigSection, RepairConfig
from madistill.stages.registry import Stage

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from madistill.evaluate.evaluator import PolicyRef
    from madistill.policies.base import TeamPolicy
    from madistill.repair.plan import Repair


def _eps(cfg: DictConfig) -> float:
    """The failure set's radius: ``repair.eps``, else the attack suite's middle budget."""
    eps = sorted(float(e) for e in cfg.attack.eps)
    return float(cfg.repair.eps) if cfg.repair.eps is not None else eps[len(eps) // 2]


def _with_policy(team: TeamPolicy, group: str, policy: Any) -> TeamPolicy:
    """``team`` with ``group``'s policy replaced (the others and every normaliser shared)."""
    from madistill.policies.base import TeamPolicy

    return TeamPolicy(team.groups, {g.name: policy if g.name == group else team[g.name] for g in team.groups},
                      team.normalizers)


def _save_delta(delta: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], group: str):
    """A writer of ``delta.safetensors``: per changed parameter ``<group>/<name>.index`` (flat indices: the
    support), ``.value`` (the repaired values there; writing them into the original rebuilds the repaired
    parameter bit for bit) and ``.delta`` (the change)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, parts in delta.items():
        for kind, t in zip(("index", "value", "delta"), parts):
            tensors[f"{group}/{name}.{kind}"] = t.detach().cpu().contiguous()
    return lambda path: save_file(tensors, str(path))


_MASKS = {"neurons": "Masked repair: the chosen neurons' weight rows and biases.",
          "fisher": "Masked repair: the acting parameters with the largest empirical Fisher information of the "
                    "fine-tuning loss (random baseline: as many random acting parameters)."}


def _markdown(payload: dict) -> str:
    """The report's tables: what changed, the chosen neurons, and the returns per variant."""
    m = payload["meta"]
    refresh = m["repair"].get("refresh", 0)
    adversarial = (f" Adversarial repair: the failures rebuilt every {refresh} steps by "
                   f"{m['repair']['adv_objective']} PGD on the policy being tuned." if refresh else "")
    if m["repair"].get("attack") == "targeted_lookahead":
        adversarial = (" Every variant fine-tuned with robust distillation's loss, the lookahead's targets forced anew "
                       "on the policy being tuned.")
        accuracy = "held-out share keeping its action under the forced target"
    else:
        accuracy = "held-out accuracy under a fresh attack" if refresh else "held-out failure accuracy"
    scored = (f" The returns are those of team {m['team']} ({', '.join(m['team_agents'])}), the repaired group's side."
              if m.get("team") else "")
    lines = [f"# Repair of {m['group']} on {m['env']}", "",
             f"Failure set: {m['failures']} failing observations from {m['failure_source']} "
             f"({m['searched']} searched). Neuron scores: {m['score']}. {_MASKS[m['repair'].get('mask', 'neurons')]}"
             f"{adversarial}{scored}", "",
             "| variant | parameters free | parameters changed | share of acting parameters | learning rate | "
             f"anchor | {accuracy} | held-out clean divergence | clean | worst attacked |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = {**({"original": {"mask_size": 0, "changed": 0, "changed_share": 0.0, **payload["original"]}}
               if "original" in payload else {}), **payload["variants"]}
    for name, v in rows.items():
        ev = v.get("evaluation", {})
        rate = v.get("learning_rate")
        bound = "" if v.get("within_divergence_bound", True) else " (none within the bound)"
        if rate is None:
            chosen = "- | - | - | -"
        else:
            val = next(t for t in v["validation"] if (t["learning_rate"], t["anchor"]) == (rate, v["anchor"]))
            chosen = f"{rate:g} | {v['anchor']:g}{bound} | {val['accuracy']:.3f} | {val['divergence']:.4f}"
        lines.append(f"| {name} | {v['mask_size']} | {v['changed']} | {v['changed_share']:.4f} | {chosen} | "
                     f"{ev.get('clean', float('nan')):.3f} | {ev.get('worst', float('nan')):.3f} |")
    where = ", ".join(f"{p} {n}" for p, n in payload["variants"]["masked"].get("changed_by_parameter", {}).items())
    lines += ["", f"The masked repair's changed entries per parameter: {where or 'none'}."]
    a = payload["ablation"]
    localisation = (" (the localisation's report: the Fisher mask, not these neurons, is what the masked repair "
                    "frees)" if m["repair"].get("mask") == "fisher" else "")
    lines += ["", f"Ablation of the {len(payload['neurons'])} chosen neurons{localisation} changes {a['top']:.3f} of "
              "the failing "
              f"actions; as many random neurons {a['random_mean']:.3f} (share of random draws at least as large: "
              f"{a['random_at_least_top']:.3f}).", "", "| layer | unit | score |", "|---|---|---|"]
    lines += [f"| {n['layer']} | {n['unit']} | {n['score']:.4g} |" for n in payload["neurons"]]
    return "\n".join(lines)


def _evaluate(cfg: DictConfig, venv: Any, played: dict[str, TeamPolicy], layouts: Any, eps: float,
              progress: str | None, sides: Any, side: str | None) -> dict[str, dict]:
    """Clean return and the worst return under the attack suite (``attack.*`` at ``eps``, over its victim sets)
    of every team of policies in ``played``, with their per-episode returns, all on the same episode seeds (so
    paired). The returns are those of team ``side`` of the env's teams ``sides`` (None: of every agent);
    ``progress``: the label of a progress bar over ``played`` (None: no bar)."""
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    from madistill.attacks.robustness import evaluate_robustness, evaluations
    from madistill.attacks.transform import victim_sets
    from madistill.common.episodes import team_returns
    from madistill.envs.teams import team_means
    from madistill.evaluate.evaluator import run_episodes, uniform_team

    ac = OmegaConf.merge(cfg.attack, {"eps": [eps], "checks": False})
    random_recs = run_episodes(venv, uniform_team(venv, next(iter(played.values())).device), ac.episodes, ac.seed, False)
    random_teams = team_means(random_recs, sides) if side is not None else None
    random_return = team_returns(random_recs) if side is None else random_teams[side]
    out = {}
    n_sets = len(victim_sets(list(ac.victims), [a for g in venv.groups for a in g.agents], sides))
    bar = tqdm(total=len(played) * evaluations(ac, n_sets), desc=progress, unit="eval", disable=progress is None)
    for name, team in played.items():
        res = evaluate_robustness(venv, team, layouts, ac, team_returns(random_recs), ac.seed, teams=sides,
                                  random_teams=random_teams, progress=bar)
        victims, attack, ret = min((res.worst_from(v, eps, side) for v in res.episodes), key=lambda w: w[2])
        clean, clean_episodes = ((res.clean, res.clean_episodes) if side is None
                                 else (res.team_clean[side], res.team_clean_episodes[side]))
        out[name] = {"clean": clean, "worst": ret, "worst_attack": f"{attack} on {victims}", "random": random_return,
                     "clean_episodes": clean_episodes.tolist(),
                     "worst_episodes": res.cells_of(side)[victims][attack][eps].tolist()}
    bar.close()
    return out


def _one_team_candidates(sides: Any, candidates: list, groups: list) -> list:
    """The candidate groups whose agents all play on one team of ``sides``: a repair of a group with agents on
    several teams has no one team's return to be judged by. One line, before any episode is played, where no
    candidate is left, naming the env's ``groups`` of one team."""
    from madistill.envs.teams import victims_team
    from madistill.errors import MadistillError

    def one_team(gs: list) -> list:
        return [g for g in gs if victims_team(sides, g.agents) is not None]

    left = one_team(candidates)
    if not left:
        single = [g.name for g in one_team(groups)]
        fix = f"set repair.group to one of {single}" if single else "this env has no group of one team to repair"
        raise MadistillError(f"group(s) {[g.name for g in candidates]} have agents on several teams "
                             f"({', '.join(sides)}), so their repair has no one team's return to judge it by: {fix}")
    return left


def _check_lookahead(cfg: DictConfig, venv: Any, eps: float) -> None:
    """One line, before any episode is played, for what ``repair.attack=targeted_lookahead`` cannot do: branch
    over Box actions (every agent is the lookahead's victim), attack at radius 0, or add a critic's values (the
    repair loads no value head)."""
    from madistill.attacks.lookahead import box_victims
    from madistill.errors import MadistillError

    box = box_victims(venv.groups, [a for g in venv.groups for a in g.agents])
    if box:
        raise MadistillError(f"repair.attack=targeted_lookahead branches over Discrete actions and group(s) {box} "
                             "have Box actions: choose another repair.attack")
    if eps <= 0:
        raise MadistillError(f"repair.attack=targeted_lookahead at eps {eps} perturbs nothing: set repair.eps > 0")
    if cfg.attack.lookahead_critic:
        raise MadistillError("repair.attack=targeted_lookahead plays the lookahead without a critic (the repair "
                             "loads no value head): set attack.lookahead_critic=false")


def _lookahead_states(cfg: DictConfig, venv: Any, team: TeamPolicy, spec: Any, layouts: Any,
                     eps: float, sides: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``repair.episodes`` episodes of ``team`` with every agent under the suite's lookahead at ``eps`` (its
    horizon and settings, ``attack.*``; the targets forced by ``repair.adv_steps`` targeted PGD steps; with
    several teams ``sides``, each team's agents targeted by their team's return): per group the observations of
    the states visited, normalised with the group's normaliser, and the target the lookahead forced on each (-1:
    none). :func:`_check_lookahead` has refused what it cannot play."""
    from madistill.attacks.budget import group_budgets
    from madistill.attacks.collection import collection_transforms
    from madistill.branching import Branching
    from madistill.common.collect import collect_labelled

    unit = group_budgets(1.0, layouts, cfg.attack.exclude, team.device, cfg.attack.scale)
    transforms = collection_transforms(venv.groups, unit, "targeted_lookahead", cfg.repair.adv_steps, 1.0, eps,
                                       cfg.attack, Branching(spec, venv.groups, venv.backend), sides=sides)
    states, targets, _ = collect_labelled(venv, team, cfg.seed + 1, True, lambda: transforms[0].targets,
                                          episodes=cfg.repair.episodes, transforms=transforms,
                                          progress="repair: episodes under the lookahead" if cfg.logger.progress else None)
    return {g: team.normalizers[g].normalize(x) for g, x in states.items()}, targets


def _failures(cfg: DictConfig, venv: Any, team: TeamPolicy, spec: Any, layouts: Any, eps: float, candidates: list,
              raw: dict[str, torch.Tensor], budgets: dict, sides: Any) -> tuple[dict, dict | None, dict | None]:
    """Per candidate group its failure set and its clean observations (normalised): from ``repair.failures``,
    from the lookahead's episodes (``repair.attack=targeted_lookahead``; then also the states it visited,
    normalised, and the targets it forced there, per group) or from ``repair.attack`` on the clean observations."""
    from madistill.attacks.robustness import suite_attack
    from madistill.repair.failures import attack_failures, file_failures, forced_failures
    from madistill.repair.neurons import repair_path

    rc = cfg.repair
    for g in candidates:
        repair_path(team[g.name])  # a policy without an MLP acting path is refused before any attack runs
    states = targets = None
    if rc.attack == "targeted_lookahead":
        states, targets = _lookahead_states(cfg, venv, team, spec, layouts, eps, sides)
    found = {}
    for g in candidates:
        norm = team.normalizers[g.name]
        clean = norm.normalize(raw[g.name])
        if rc.failures is not None:
            fs = file_failures(rc.failures, team[g.name], norm, team.device)
        elif states is not None:
            fs = forced_failures(team[g.name], states[g.name], targets[g.name], rc.adv_steps, budgets[g.name],
                                 cfg.seed, f"{rc.attack} at eps {eps}", rc.max_failures)
        else:
            fs = attack_failures(team[g.name], clean, suite_attack(rc.attack, cfg.attack), budgets[g.name], cfg.seed,
                                 f"{rc.attack} at eps {eps}", rc.max_failures)
        found[g.name] = (fs, clean)
    return found, states, targets


def _terms(cfg: DictConfig, policy: Any, states: dict | None, targets: dict | None, layout: Any, budget: Any):
    """What the repair's fine-tunes fit: the lookahead's forced targets (with robust distillation's loss), the
    failures rebuilt every ``repair.refresh`` steps, or the fixed failure set."""
    from madistill.attacks.methods import training_attack
    from madistill.attacks.robustness import suite_attack
    from madistill.distill.loss import DistillLoss
    from madistill.repair.failures import Adversary
    from madistill.repair.plan import fixed_terms, forced_target_terms, rebuilt_terms

    rc = cfg.repair
    group = policy.group.name
    if states is not None:
        objective = DistillLoss(adv_weight=rc.adv_weight, smooth_weight=rc.smooth_weight, adv_steps=rc.adv_steps)
        return forced_target_terms(policy, states[group], targets[group], objective, layout, budget, rc.validation,
                                   cfg.seed)
    if rc.refresh:
        train = training_attack(str(rc.adv_objective), rc.adv_steps, cfg.attack.target_candidates)
        return rebuilt_terms(Adversary(rc.refresh, train, suite_attack(rc.attack, cfg.attack), budget), policy)
    return fixed_terms


def _payload(cfg: DictConfig, group: str, failures: Any, rep: Repair, spec: Any, source: Path,
             side: str | None, sides: Any) -> dict:
    """The report's JSON, without the evaluation; ``side``: the team of ``sides`` whose returns it gives (None:
    one team, every agent)."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from madistill.repair.masked import changed_count

    return {
        "meta": {"policy": str(source), "group": group, "env": spec.id, "eps": _eps(cfg), "failures": len(failures),
                 "failure_source": failures.source, "searched": failures.searched, "score": cfg.repair.score,
                 "acting_parameters": rep.acting_parameters, "repair": OmegaConf.to_container(cfg.repair),
                 "team": side, "team_agents": list(sides[side]) if side is not None else None},
        "neurons": [{"layer": rep.layer_names[i], "unit": u, "score": sc} for (i, u), sc in zip(rep.neurons, rep.chosen_scores)],
        "ablation": rep.ablation,
        "variants": {name: {"mask_size": rep.mask_sizes[name], "changed": changed_count(rep.deltas[name]),
                            "changed_share": changed_count(rep.deltas[name]) / rep.acting_parameters,
                            "changed_by_parameter": {p: len(d[0]) for p, d in rep.deltas[name].items()},
                            "learning_rate": rep.selection[name].chosen.learning_rate,
                            "anchor": rep.selection[name].chosen.anchor,
                            "within_divergence_bound": rep.selection[name].within_bound,
                            "validation": [asdict(t) for t in rep.selection[name].trials]}
                     for name in rep.policies},
    }


def _check_failures_file(rc: Any, candidates: list, team: TeamPolicy) -> None:
    """Refuse a ``repair.failures`` file that cannot be repaired before any episode is played: with
    ``repair.refresh``, for several candidate groups, or unreadable or of the wrong shape for its group."""
    from madistill.errors import MadistillError
    from madistill.repair.failures import file_failures

    if rc.refresh:
        raise MadistillError("repair.refresh rebuilds the failures by attacking the clean observations, so it "
                             "cannot repair a repair.failures file: set repair.refresh=0 or drop repair.failures")
    if rc.group is None and len(candidates) > 1:
        raise MadistillError(f"repair.failures holds one group's observations: set repair.group to one of "
                             f"{[g.name for g in candidates]}")
    group = candidates[0].name
    file_failures(rc.failures, team[group], team.normalizers[group], team.device)


def _repaired_policy(refs: list[PolicyRef], policy: str) -> Path:
    """The policy directory ``repair.policy`` names: a run's teacher, else its only policy; a directory of several
    runs (a sweep) is refused in one line, as a repair edits one policy."""
    from madistill.errors import MadistillError
    from madistill.policies.store import find_policy_dir

    runs = sorted({str(r.path.parent.parent) for r in refs})
    if len(runs) > 1:
        raise MadistillError(f"repair.policy={policy} holds the policies of {len(runs)} runs (a sweep): a repair edits "
                             f"one policy, so pass one run, e.g. repair.policy={runs[0]}")
    return find_policy_dir(refs[0].path)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Build the failure set of the repaired group (attack or ``repair.failures``), score and choose its neurons,
    fine-tune them (and the baselines), save the masked repair as a drop-in policy with ``delta.safetensors``,
    and write ``reports/repair.{json,md}``."""
    import json

    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    from madistill.attacks.budget import group_budgets
    from madistill.attacks.transform import victim_sets
    from madistill.common.collect import collect_round
    from madistill.common.io import atomic_write_text
    from madistill.envs.features import feature_layouts
    from madistill.envs.teams import several_teams, victims_team
    from madistill.errors import MadistillError
    from madistill.evaluate.report import write_markdown
    from madistill.policies.store import load_team, save_team
    from madistill.repair.plan import repair_policy
    from madistill.runtime import make_vec_env
    from madistill.stages.policies import configured_features, studied_policies, teams_for
    from madistill.stages.rundir import open_tb, tensorboard_line

    rc = cfg.repair
    device, refs, spec = studied_policies(cfg, rc.policy, "no policy to repair: pass repair.policy=<run or policy "
                                          "directory>", add_teachers=False)
    source = _repaired_policy(refs, rc.policy)
    eps = _eps(cfg)
    with make_vec_env(cfg.env, spec) as venv:
        teams = teams_for(cfg, venv, refs)
        # with several teams the returns measured are those of the repaired group's team
        sides = teams if several_teams(teams) else None
        team, manifest = load_team(source, venv.groups, device=device)
        names = [g.name for g in venv.groups]
        if rc.group is not None and rc.group not in names:
            raise MadistillError(f"repair.group={rc.group!r} is not a group of this env: use one of {names}")
        candidates = [g for g in venv.groups if (rc.group is None or g.name == rc.group)]
        if rc.evaluate:  # the suite's victim sets, checked before the repair's work rather than after it
            victim_sets(list(cfg.attack.victims), [a for g in venv.groups for a in g.agents], sides)
        if sides is not None:
            candidates = _one_team_candidates(sides, candidates, venv.groups)
        if not any(g.discrete for g in candidates):
            discrete = [g.name for g in venv.groups if g.discrete]
            raise MadistillError("repair needs a Discrete-action group (a failure is a changed action): "
                                 + (f"set repair.group to one of {discrete}" if discrete else
                                    "this env's groups all act in Box spaces, which repair does not support"))
        candidates = [g for g in candidates if g.discrete]
        if rc.failures is not None:
            _check_failures_file(rc, candidates, team)
        if rc.attack == "targeted_lookahead":
            _check_lookahead(cfg, venv, eps)
        layouts = feature_layouts(venv.groups, configured_features(cfg, spec), venv.feature_names, cfg.saliency.image_patch)
        raw, _ = collect_round(venv, team, cfg.seed, True, episodes=rc.episodes,
                               progress="repair: clean episodes" if cfg.logger.progress else None)
        budgets = group_budgets(eps, layouts, cfg.attack.exclude, device, cfg.attack.scale)
        found, states, targets = _failures(cfg, venv, team, spec, layouts, eps, candidates, raw, budgets, sides)
        group = max(found, key=lambda name: len(found[name][0]))
        failures, clean = found[group]
        if len(failures) == 0 and states is not None:
            raise MadistillError(f"the lookahead at eps {eps} forced no target that {sorted(found)} took in "
                                 f"{failures.searched} targeted of {len(states[group])} visited states: raise "
                                 "repair.eps or repair.episodes, or set repair.group to another group")
        if len(failures) == 0:
            raise MadistillError(f"the {rc.attack} attack at eps {eps} changes no action of {sorted(found)} in "
                                 f"{failures.searched} observations: raise repair.eps or repair.episodes")
        freed = "the Fisher mask" if rc.mask == "fisher" else f"{rc.neurons:.0%} of the neurons"
        tqdm.write(f"repair: {len(failures)} failing observations of {group} ({failures.source}); scoring neurons "
                   f"by {rc.score}, fine-tuning {freed} and {len(rc.baselines)} baselines")
        policy = team[group]
        terms = _terms(cfg, policy, states, targets, layouts[group], budgets[group])
        rep = repair_policy(policy, failures, clean, rc, cfg.seed, terms,
                            "repair: fine-tunes" if cfg.logger.progress else None)
        side = None if sides is None else victims_team(sides, policy.group.agents)
        payload = _payload(cfg, group, failures, rep, spec, source, side, sides)
        if rc.evaluate:
            played = {"original": team, **{n: _with_policy(team, group, p) for n, p in rep.policies.items()}}
            evaluation = _evaluate(cfg, venv, played, layouts, eps,
                                   "repair: attack suite" if cfg.logger.progress else None, sides, side)
            payload["original"] = {"evaluation": evaluation.pop("original")}
            for name, ev in evaluation.items():
                payload["variants"][name]["evaluation"] = ev
    repaired = _with_policy(team, group, rep.policies["masked"])
    config = manifest.get("config", {})
    config = {**config, "repair": {**OmegaConf.to_container(rc), "from": str(source), "group": group}}
    role = manifest.get("role", refs[0].name)
    pdir = save_team(run_dir / "policies" / role, repaired, spec, role, config=config,
                     extra_files={"delta.safetensors": _save_delta(rep.deltas["masked"], group)},
                     training=manifest.get("training"))
    reports = run_dir / "reports"
    atomic_write_text(reports / "repair.json", json.dumps(payload, indent=2))
    text = _markdown(payload)
    write_markdown(reports / "repair.md", text)
    with open_tb(cfg, run_dir) as tb:
        tb.text("repair/report", text)
        for name, variant in payload["variants"].items():
            tb.scalar(f"repair/{name}/changed_share", variant["changed_share"], 0)
        for name, variant in {"original": payload.get("original", {}), **payload["variants"]}.items():
            for key in ("clean", "worst") if "evaluation" in variant else ():
                tb.scalar(f"repair/{name}/{key}_return", variant["evaluation"][key], 0)
    m = payload["variants"]["masked"]
    print(f"\nrepaired {group}: {m['changed']} parameters changed ({100 * m['changed_share']:.2f}% of the acting "
          f"parameters), {f'{len(rep.neurons)} neurons' if rc.mask == 'neurons' else 'Fisher mask'}\n"
          + "".join(f"  {line}\n" for line in _outcome(payload, int(cfg.attack.episodes)))
          + f"  policy: {pdir}\n  update: {pdir / 'delta.safetensors'}\n"
          f"  report: {reports / 'repair.md'}\n  {tensorboard_line(cfg, run_dir)}")
    return payload


def _outcome(payload: dict, episodes: int) -> list[str]:
    """The lines that say what the masked repair did to the clean and the worst attacked return, against the
    original on the same episodes, and a warning where it lowered either (no lines without an evaluation)."""
    if "evaluation" not in payload.get("original", {}):
        return []
    o, m = payload["original"]["evaluation"], payload["variants"]["masked"]["evaluation"]
    lines = [f"clean return {o['clean']:.2f} -> {m['clean']:.2f}, worst case under the attack suite {o['worst']:.2f} "
             f"-> {m['worst']:.2f} ({m['worst_attack']}; {episodes} episodes each, same seeds)"]
    lower = [what for what, key in (("clean return", "clean"), ("worst case", "worst")) if m[key] < o[key]]
    if lower:
        lines.append(f"warning: the repair lowered the {' and the '.join(lower)} on these episodes: compare the "
                     "baselines in the report, or evaluate on more episodes (attack.episodes) before using it")
    return lines


STAGE = Stage(
    name="repair",
    run=run,
    summary="localise the neurons behind a group's attack failures and fine-tune only them (with baselines)",
    sections=("repair", "attack"),
    writes="policies/<role> (the repaired policy, with delta.safetensors), reports/repair.{json,md}",
    examples=("madistill repair repair.policy=runs/train/simple_speaker_listener_v4/<time>",
              "madistill repair repair.policy=<run> repair.score=ig repair.group=listener"),
    policy_key="repair.policy",
    adds=(ConfigSection("repair", RepairConfig),),
)
