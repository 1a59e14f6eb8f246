"""Checks that flag gradient masking (Athalye et al. 2018; Carlini et al. 2019): signs that a policy looks
robust because its gradients mislead white-box attacks, not because it is.

Two levels, both run with every robustness evaluation:

- **objective level** (:func:`probe`): on a batch of observations, the policy divergence each attack reaches
  inside the same budget. Cheap and exact, so it also catches masking that returns would hide.
- **return level** (:func:`return_checks`): on the evaluated team returns.

Flags: ``pgd_weaker_than_fgsm``; ``pgd_not_converged`` (more steps and restarts change the result
materially); ``no_collapse`` (the return does not fall as eps grows, or stays high at a very large eps);
``gradient_free_stronger`` / ``transfer_stronger`` (attacks without the victim's gradients beat white-box PGD);
``zero_gradients`` (most observations have an exactly zero input gradient).

A check compares attacks, so an attack that changed nothing is no evidence: such an attack is reported as
``degenerate_attack`` (its own failing, not the policy's) and the comparisons it would decide are not made.

One return-level flag is about the attack suite, not about masking: ``objective_misses_return`` (a targeted
attack, which forces a chosen action, lowers the return materially more than every untargeted one, whose
objectives only push the action away from its clean choice). Another is about the learned attacks
(:func:`training_checks`): ``under_trained`` (a learned attack's return is above the strongest gradient
attack's, so it has not learned the attack it is meant to find, and its number is no result).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack, Objective, variants
from madistill.common.bootstrap import resample
from madistill.policies.base import Policy

DEGENERATE = "degenerate_attack"  # the name of a Flag that reports an attack, not the policy
OBJECTIVE_MISSES = "objective_misses_return"  # the name of a Flag that reports the suite's objectives, not masking
# the attacks that maximise a surrogate objective without choosing the action they cause
# the suite's per-step attacks that push the action away from its clean choice along (estimated) gradients: every
# variant but the uniform draw and the targeted PGDs, so a variant added to the suite joins the return-level checks
UNTARGETED = tuple(name for name, a in variants(Attack()).items() if a.method not in ("random", "targeted"))
TARGETED_PREFIX = "targeted_"
UNDER_TRAINED = "under_trained"  # the name of a Flag that reports a learned attack short of the gradient attacks
LEARNED = ("learned", "director")  # the attacks trained by RL against the frozen team


@dataclass(frozen=True)
class Flag:
    name: str
    detail: str


def probe(
    policy: Policy,
    x: torch.Tensor,
    budget: Budget,
    pgd: Attack,
    generator: torch.Generator | None = None,
    tolerance: float = 0.5,
    surrogate: Policy | None = None,
) -> tuple[dict[str, float], list[Flag]]:
    """Mean KL(pi(x) || pi(x_adv)) reached by FGSM, PGD, stronger PGD (2x steps, 2x restarts), SPSA and, with a
    ``surrogate``, PGD crafted on it; plus the share of zero input gradients.

    A flag needs one attack to reach ``1 + tolerance`` times the other's divergence: the KL landscape is
    non-concave (it is flat at delta = 0), so restarts of a sound PGD already gain tens of percent.

    An attack that leaves the action distribution exactly unchanged on most observations while the policy's
    input gradients are not zero there is degenerate (the attack, not the policy, failed): it is reported as
    a ``degenerate_attack`` Flag and takes part in no comparison. Where the gradients are zero, the same
    failure is the policy's masking and is flagged as ``zero_gradients``.
    """
    kl = Objective("kl", policy, x, None)
    suite = variants(pgd)
    crafted = {name: suite[name](policy, x, budget, generator) for name in ("fgsm", "pgd", "pgd_strong", "spsa")}
    if surrogate is not None:
        crafted["transfer"] = pgd(surrogate, x, budget, generator)
    with torch.no_grad():
        divergences = {name: kl(x_adv) for name, x_adv in crafted.items()}
    reached = {name: float(d.mean()) for name, d in divergences.items()}
    grad = Objective("ce", policy, x, None).gradient(budget.sample(x, generator))
    reached["zero_gradient_share"] = float((grad.abs().amax(-1) == 0).float().mean())
    unchanged = {name: float((d == 0).float().mean()) for name, d in divergences.items()}
    degenerate = {name for name, share in unchanged.items() if share > 0.5 and reached["zero_gradient_share"] <= 0.5}
    flags = [Flag(DEGENERATE, f"{name} leaves the action distribution unchanged on {100 * unchanged[name]:.0f}% of "
                  "observations although the policy has input gradients there: not used as evidence")
             for name in sorted(degenerate)]

    def beats(a: str, b: str) -> bool:
        return not {a, b} & degenerate and reached[a] > (1 + tolerance) * reached[b] + 1e-9

    white_box = "pgd_strong" if reached["pgd_strong"] >= reached["pgd"] else "pgd"
    if beats("fgsm", "pgd"):
        flags.append(Flag("pgd_weaker_than_fgsm", f"KL reached: PGD {reached['pgd']:.4f} < FGSM {reached['fgsm']:.4f}"))
    if beats("pgd_strong", "pgd"):
        flags.append(Flag("pgd_not_converged", f"KL reached: PGD {reached['pgd']:.4f}, 2x steps + restarts {reached['pgd_strong']:.4f}"))
    if beats("spsa", white_box):
        flags.append(Flag("gradient_free_stronger", f"KL reached: SPSA {reached['spsa']:.4f} > PGD {reached[white_box]:.4f}"))
    if "transfer" in reached and beats("transfer", white_box):
        flags.append(Flag("transfer_stronger", f"KL reached: transfer {reached['transfer']:.4f} > PGD {reached[white_box]:.4f}"))
    if reached["zero_gradient_share"] > 0.5:
        flags.append(Flag("zero_gradients", f"{100 * reached['zero_gradient_share']:.0f}% of observations have a zero input gradient"))
    return reached, flags


def return_checks(
    returns: Mapping[str, Mapping[float, np.ndarray]],
    clean: np.ndarray,
    random: float,
    tolerance: float = 0.1,
    collapse_eps: float | None = None,
    seed: int = 0,
    n_boot: int = 1000,
    objective_tolerance: float = 0.1,
) -> list[Flag]:
    """Flags from per-episode team returns ``returns[attack][eps]`` and ``clean`` (every cell played the same
    episode seeds; attacks named as in the suite: ``fgsm``, ``pgd``, ``pgd_strong``, ``spsa``, ``transfer``).

    A difference is material when its mean exceeds ``tolerance`` times the clean gain over random and its
    paired-bootstrap 95% CI excludes zero, so episode noise alone never raises a flag. ``collapse_eps``: a
    budget at which PGD on all agents should leave less than half of the gain. An attack with the clean
    return on every episode changed nothing, so PGD's return above it is no evidence against PGD: that
    comparison is reported as a ``degenerate_attack`` Flag instead. At each eps, the strongest targeted attack
    (``targeted_*``) materially below the strongest of :data:`UNTARGETED` raises ``objective_misses_return``,
    where material means a mean gap over ``objective_tolerance`` times the clean gain (and a CI excluding zero).
    """
    gain = float(np.mean(clean)) - random
    rng = np.random.default_rng(seed)

    def worse(a: np.ndarray, b: np.ndarray, share: float = tolerance) -> bool:
        """True when return ``a`` is materially below ``b`` (paired by episode): by over ``share`` of the gain."""
        d = b - a
        boots = resample(d, n_boot, rng).mean(1)
        return bool(d.mean() > share * abs(gain) and np.percentile(boots, 2.5) > 0)

    flags = []
    pgd = dict(returns.get("pgd", {}))
    stronger = (("fgsm", "pgd_weaker_than_fgsm"), ("pgd_strong", "pgd_not_converged"), ("spsa", "gradient_free_stronger"),
                ("transfer", "transfer_stronger"))
    for eps, r in sorted(pgd.items()):
        for other, name in stronger:
            if eps not in returns.get(other, {}) or not worse(returns[other][eps], r):
                continue
            o = returns[other][eps]
            if np.array_equal(o, clean):
                flags.append(Flag(DEGENERATE, f"eps {eps:g}: {other} left every episode's return as it was clean "
                                  f"({o.mean():.2f}), so PGD's {r.mean():.2f} above it is no evidence of {name}"))
            else:
                flags.append(Flag(name, f"eps {eps:g}: {other} return {o.mean():.2f} < PGD {r.mean():.2f}"))
    ordered = [e for e in sorted(pgd) if e != collapse_eps]
    rising = [(a, b) for a, b in zip(ordered, ordered[1:]) if worse(pgd[a], pgd[b])]
    if rising:
        flags.append(Flag("no_collapse", "PGD return rises with eps: " + ", ".join(
            f"{pgd[a].mean():.2f} at eps {a:g} -> {pgd[b].mean():.2f} at {b:g}" for a, b in rising)))
    if collapse_eps is not None and collapse_eps in pgd and pgd[collapse_eps].mean() - random > 0.5 * gain:
        flags.append(Flag("no_collapse", f"eps {collapse_eps:g}: PGD leaves {pgd[collapse_eps].mean():.2f}, over half the gain over random {random:.2f}"))
    for eps in sorted({e for r in returns.values() for e in r}):
        targeted = {a: r[eps] for a, r in returns.items() if eps in r and a.startswith(TARGETED_PREFIX)}
        untargeted = {a: r[eps] for a, r in returns.items() if eps in r and a in UNTARGETED}
        if not targeted or not untargeted:
            continue
        t = min(targeted, key=lambda a: targeted[a].mean())
        u = min(untargeted, key=lambda a: untargeted[a].mean())
        if worse(targeted[t], untargeted[u], objective_tolerance):
            flags.append(Flag(OBJECTIVE_MISSES, f"eps {eps:g}: {t} return {targeted[t].mean():.2f} < {u} "
                              f"{untargeted[u].mean():.2f}, the strongest untargeted attack: its objective misses "
                              "what lowers the return"))
    return flags


def training_checks(returns: Mapping[str, Mapping[float, np.ndarray]], seed: int = 0, n_boot: int = 1000) -> list[Flag]:
    """``under_trained`` flags from per-episode returns ``returns[attack][eps]`` (every cell on the same episode
    seeds): at each eps, a learned attack (:data:`LEARNED`) whose mean return is above the lowest mean return of
    the gradient attacks there (:data:`UNTARGETED` and ``targeted_*``). A learned attack is meant to find the
    worst case; one weaker than a gradient attack has not learned it yet, so its return is no result. The
    detail gives the gap with its paired-bootstrap 95% CI."""
    rng = np.random.default_rng(seed)
    flags = []
    for eps in sorted({e for r in returns.values() for e in r}):
        gradient = {a: r[eps] for a, r in returns.items() if eps in r and (a in UNTARGETED or a.startswith(TARGETED_PREFIX))}
        if not gradient:
            continue
        best = min(gradient, key=lambda a: np.nanmean(gradient[a]))
        for attack in (a for a in LEARNED if eps in returns.get(a, {})):
            gap = returns[attack][eps] - gradient[best]
            gap = gap[np.isfinite(gap)]  # a team's return is NaN in an episode none of its agents took part in
            if gap.size and gap.mean() > 0:
                lo, hi = np.percentile(resample(gap, n_boot, rng).mean(1), [2.5, 97.5])
                flags.append(Flag(UNDER_TRAINED, f"eps {eps:g}: {attack} return {np.nanmean(returns[attack][eps]):.2f} > "
                                  f"{best} {np.nanmean(gradient[best]):.2f}, the strongest gradient attack (gap {gap.mean():.2f} "
                                  f"[{lo:.2f}, {hi:.2f}]): under-trained, not a result"))
    return flags
