"""``madistill attack``: robustness of saved policies to observation attacks, with gradient-masking checks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from madistill.stages.registry import Stage

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from madistill.attacks.robustness import RobustnessResult
    from madistill.envs.teams import Teams
    from madistill.policies.base import TeamPolicy


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Robustness of every saved policy under ``attack.policy`` against the attack suite, with the
    gradient-masking checks. Writes ``reports/robustness.{json,md}``, return-vs-eps curves (PNG and
    TensorBoard), TensorBoard scalars ``attack/<policy>/<victims>/<attack>`` over eps (x100) and the learned
    attacks' training curves ``attack_training/<policy>/<victims>/<attack>/eps<eps>`` (the attacker's episode
    return over env steps)."""
    import json
    import sys

    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    from madistill.attacks.robustness import NoAttackRuns, evaluate_robustness, evaluations, markdown_report
    from madistill.attacks.transform import victim_sets
    from madistill.common.episodes import team_returns
    from madistill.common.io import atomic_write_text
    from madistill.envs.features import feature_layouts
    from madistill.envs.teams import team_means
    from madistill.evaluate.evaluator import PolicyRef, run_episodes, uniform_team
    from madistill.evaluate.report import write_markdown
    from madistill.policies.purified import attack_view
    from madistill.policies.store import load_team
    from madistill.runtime import make_vec_env
    from madistill.stages.faults import configured_faults, fault_meta, played_under
    from madistill.stages.policies import (
        configured_features,
        configured_purifier,
        load_policy,
        paired_policy,
        policy_labels,
        purifier_meta,
        studied_policies,
        teams_for,
    )

    ac = cfg.attack
    # a student's teacher joins as its transfer surrogate and critic, unless both are given
    device, refs, spec = studied_policies(
        cfg, ac.policy, "no policy to attack: pass attack.policy=<run, policy or sweep directory>",
        add_teachers=not (ac.critic and ac.transfer_from),
    )
    results, labels, unattacked = {}, policy_labels(refs), {}
    with make_vec_env(cfg.env, spec) as venv:
        purifier = configured_purifier(cfg, device)
        loaded = [load_policy(r, venv.groups, device, purifier, cfg.seed) for r in refs]
        layouts = feature_layouts(venv.groups, configured_features(cfg, spec), venv.feature_names, cfg.saliency.image_patch)
        sides = teams_for(cfg, venv, refs)
        faults = configured_faults(cfg, venv, spec, device, sides)
        random_recs = run_episodes(venv, uniform_team(venv, device), ac.episodes, ac.seed, False)
        random_return = team_returns(random_recs)
        extra = {k: load_team(getattr(ac, k), venv.groups, device=device)[0] for k in ("critic", "transfer_from") if getattr(ac, k)}
        n_sets = len(victim_sets(list(ac.victims), [a for g in venv.groups for a in g.agents], sides))
        per_policy = evaluations(ac, n_sets)

        def partner(ref: PolicyRef, role: str) -> TeamPolicy | None:
            i = paired_policy(ref, role, refs)
            return None if i is None else loaded[i]

        with tqdm(total=len(refs) * per_policy, desc="attack", unit="eval", disable=not cfg.logger.progress) as bar:
            for ref, team, label in zip(refs, loaded, labels):
                # the critic attack needs a value from one agent's observation: a centralised critic has none
                critic = extra.get("critic") or next(
                    (c for c in (team, partner(ref, "teacher")) if c is not None and _has_value(c)), None)
                surrogate = extra.get("transfer_from") or partner(ref, "student" if ref.name == "teacher" else "teacher")
                bar.set_postfix(policy=label)
                try:
                    results[label] = evaluate_robustness(
                        venv, team, layouts, ac, random_return, ac.seed, surrogate=surrogate, critic=critic,
                        progress=bar, teams=sides, random_teams=team_means(random_recs, sides), faults=faults,
                        attacked=attack_view(team, str(cfg.purify.gradient), cfg.purify.eot_samples, cfg.seed + 1),
                    )
                except NoAttackRuns as e:  # the other policies' attacks can still run: this one is left out
                    if len(refs) == 1:
                        raise
                    unattacked[label] = str(e)
                    tqdm.write(f"madistill: note: {label} left out: {e}", file=sys.stderr)
        if not results:
            raise NoAttackRuns(next(iter(unattacked.values())))
        refs, labels = zip(*[(r, label) for r, label in zip(refs, labels) if label in results])
    reports = run_dir / "reports"
    payload = {
        "meta": {"env": spec.to_dict(), "policies": {label: str(r.path) for r, label in zip(refs, labels)},
                 "episodes": ac.episodes,
                 "seed": ac.seed, "attack": OmegaConf.to_container(ac, resolve=True),
                 "fault": fault_meta(cfg),
                 "purifier": purifier_meta(cfg, attacks=True), "left_out": unattacked},
        "results": {n: r.to_dict() for n, r in results.items()},
    }
    atomic_write_text(reports / "robustness.json", json.dumps(payload, indent=2))
    played = played_under(cfg, attacks=True)
    text = markdown_report(results, spec.id, ac.episodes) + "".join(f"\n{n}\n" for n in played)
    write_markdown(reports / "robustness.md", text)
    _log_tensorboard(cfg, run_dir, results, text, spec.id)
    lines = _summary(results, cfg, spec.id, sides, run_dir)
    print("\n".join([*lines[:-2], *(f"  {n}" for n in played), *lines[-2:]]))  # before where the report is
    return payload


def _log_tensorboard(cfg: DictConfig, run_dir: Path, results: dict, text: str, env_id: str) -> None:
    """The report as text, every worst-case cell as a scalar over eps (x100), the learned attacks' training
    curves over env steps and, with figures on, the return-vs-eps curves per victim set."""
    from madistill.attacks.robustness import curves_figure
    from madistill.stages.results import side_tag
    from madistill.stages.rundir import open_tb

    victims = list(next(iter(results.values())).returns)
    with open_tb(cfg, run_dir) as tb:
        tb.text("attack/report", text)
        for name, res in results.items():
            for side in [None, *res.teams]:
                for vname, table in res.returns_of(side).items():
                    for method, by_eps in table.items():
                        for eps, value in sorted(by_eps.items()):
                            tb.scalar(f"attack/{name}/{side_tag(side)}{vname}/{method}", value, int(round(100 * eps)))
            for vname, by_method in res.training.items():
                for method, by_eps in by_method.items():
                    for eps, points in by_eps.items():
                        for step, value in points:
                            tb.scalar(f"attack_training/{name}/{vname}/{method}/eps{eps:g}", value, step)
        if cfg.logger.figures:
            for vname in victims:
                tb.figure(f"attack/curves_{vname}", curves_figure(results, vname, env_id))

def _summary(results: dict[str, RobustnessResult], cfg: DictConfig, env_id: str, sides: Teams, run_dir: Path) -> list[str]:
    """The lines the stage prints: each policy's clean return and worst case at each eps, PGD's cost, the
    gradient-masking flags and where the report is."""
    from madistill.attacks.robustness import CHECKS_NOT_RUN
    from madistill.envs.teams import several_teams
    from madistill.stages.rundir import tensorboard_line

    ac = cfg.attack

    flags = sum(len(f) for r in results.values() for f in r.flags.values())
    whose = "each team's return" if several_teams(sides) else "team return"
    lines = ["", f"Robustness on {env_id} ({whose}; worst case over the suite at each eps):"]
    eps = sorted(float(e) for e in ac.eps)
    for name, res in results.items():
        for side in list(res.teams) or [None]:
            clean = res.clean if side is None else res.team_clean[side]
            for vname in res.returns:
                worst = ", ".join(f"eps {e:g}: {value:.2f} ({attack})" for e in eps
                                  for attack, value in [res.worst(vname, e, side)])
                lines.append(f"  {name:<8} {'' if side is None else f'team {side} '}clean {clean:.2f} | victims "
                             f"{vname}: {worst}")
    for name, res in results.items():
        if "pgd" in res.seconds:
            lines.append(f"  {name:<8} evaluation wall time: clean {res.seconds['clean']:.2f} s, under PGD-{ac.steps} "
                         f"({ac.restarts} restarts) {res.seconds['pgd']:.2f} s ({res.seconds['pgd'] / res.seconds['clean']:.1f}x)")
    weak = sum(len(f) for r in results.values() for f in r.under_trained.values())
    if weak:
        lines.append(f"  learned attacks under-trained (weaker than a gradient attack, not a result): {weak} (see the report)")
    reports = run_dir / "reports"
    return [
        *lines,
        (f"  gradient-masking flags: {flags}" + (" (see the report)" if flags else "")) if ac.checks
        else f"  gradient-masking checks: {CHECKS_NOT_RUN}",
        f"  report:      {reports / 'robustness.md'}",
        f"  {tensorboard_line(cfg, run_dir)}",
    ]


def _has_value(team: TeamPolicy) -> bool:
    """Whether every group's policy has a value head that reads one agent's observation (a local critic)."""
    import torch

    return all(team[g.name].value(torch.zeros(1, g.obs_dim, device=team.device)) is not None for g in team.groups)


STAGE = Stage(
    name="attack",
    run=run,
    summary="robustness of saved policies to observation attacks (attack.policy=<run or policy dir>)",
    sections=("attack", "fault", "purify"),
    writes="reports/robustness.{md,json}",
    examples=("madistill attack attack.policy=<run>",
              "madistill attack attack=quick attack.policy=<run>",
              "madistill attack attack.policy=<run> \"attack.victims=[listener_0]\" \"attack.eps=[0.1,0.3]\""),
    policy_key="attack.policy",
)
