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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack, Objective
from madistill.policies.base import Policy


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
    """Mean KL(pi(x) || pi(x_adv)) reached by FGSM, PGD, stronger PGD (2x steps, 3 restarts), SPSA and, with a
    ``surrogate``, PGD crafted on it; plus the share of zero input gradients.

    A flag needs one attack to reach ``1 + tolerance`` times the other's divergence: the KL landscape is
    non-concave (it is flat at delta = 0), so restarts of a sound PGD already gain tens of percent.
    """
    kl = Objective("kl", policy, x, None)
    attacks = {
        "fgsm": replace(pgd, method="fgsm", objective="ce"),
        "pgd": pgd,
        "pgd_strong": replace(pgd, steps=2 * pgd.steps, restarts=max(3, pgd.restarts)),
        "spsa": replace(pgd, method="spsa", objective="kl"),
    }
    reached = {}
    for name, attack in attacks.items():
        reached[name] = float(kl(attack(policy, x, budget, generator)).mean())
    if surrogate is not None:
        reached["transfer"] = float(kl(pgd(surrogate, x, budget, generator)).mean())
    grad = Objective("ce", policy, x, None).gradient(budget.sample(x, generator))
    reached["zero_gradient_share"] = float((grad.abs().amax(-1) == 0).float().mean())
    def beats(a: str, b: str) -> bool:
        return reached[a] > (1 + tolerance) * reached[b] + 1e-9

    flags = []
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
    returns: Mapping[str, Mapping[float, float]],
    clean: float,
    random: float,
    tolerance: float = 0.1,
    collapse_eps: float | None = None,
) -> list[Flag]:
    """Flags from mean team returns ``returns[attack][eps]`` (attacks named as in the robustness config:
    ``fgsm``, ``pgd``, ``pgd_strong``, ``spsa``, ``transfer``, ...). ``tolerance`` is a share of the clean
    gain over random; ``collapse_eps``: a budget at which PGD should leave less than half of that gain."""
    gain = clean - random
    tol = tolerance * abs(gain)
    flags = []
    pgd = dict(returns.get("pgd", {}))
    for eps, r in sorted(pgd.items()):
        if eps in returns.get("fgsm", {}) and r > returns["fgsm"][eps] + tol:
            flags.append(Flag("pgd_weaker_than_fgsm", f"eps {eps}: PGD return {r:.2f} > FGSM {returns['fgsm'][eps]:.2f}"))
        if eps in returns.get("pgd_strong", {}) and returns["pgd_strong"][eps] < r - tol:
            flags.append(Flag("pgd_not_converged", f"eps {eps}: PGD {r:.2f}, 2x steps + restarts {returns['pgd_strong'][eps]:.2f}"))
        for other, name in (("spsa", "gradient_free_stronger"), ("transfer", "transfer_stronger")):
            if eps in returns.get(other, {}) and returns[other][eps] < r - tol:
                flags.append(Flag(name, f"eps {eps}: {other} return {returns[other][eps]:.2f} < PGD {r:.2f}"))
    ordered = [pgd[e] for e in sorted(pgd) if collapse_eps is None or e != collapse_eps]
    if any(b > a + tol for a, b in zip(ordered, ordered[1:])):
        flags.append(Flag("no_collapse", f"PGD return rises with eps: {[round(v, 2) for v in ordered]}"))
    if collapse_eps is not None and collapse_eps in pgd and pgd[collapse_eps] - random > 0.5 * gain:
        flags.append(Flag("no_collapse", f"eps {collapse_eps}: PGD leaves {pgd[collapse_eps]:.2f}, over half the gain over random {random:.2f}"))
    return flags
