"""Observation attacks against any Policy, batched: ``x_adv = attack(policy, x, budget, generator)``.

Every attack works in normalised units inside a Budget and returns a point of the budget's ball.
Objectives (maximised):

- ``kl``: KL(pi(x) || pi(x + delta)), the policy-divergence objective of SA-PPO/MAD (Zhang et al. 2020);
  for Gaussian policies the closed-form Gaussian KL, 0.5 ||(mu(x + delta) - mu(x)) / sigma||^2.
- ``ce``: cross-entropy of the clean greedy action, -log pi(a*(x) | x + delta) (Huang et al. 2017); for
  Gaussian policies a* is the clean mean, so this is the same squared shift of the mean in std units plus a
  constant.
- ``value``: minus a critic's value V(x + delta) (the critic attack; the critic is any Policy with ``value``).
- ``target``: log pi(target | x + delta) of a chosen target action; for Gaussian policies log N(target;
  mu(x + delta), sigma), i.e. minus half the squared distance of the mean to the target point in std units.

Methods: ``random`` (uniform in the ball), ``fgsm`` (one signed-gradient step of size eps; from a stationary
objective's clean minimum, along the gradient at a random point of the ball), ``pgd`` (k signed steps from
random starts, each from the best point so far with a step halved when it does not improve; the best point
visited kept per sample), ``spsa`` (the same steps on a gradient estimated from function values only:
gradient-free, so it cannot be fooled by masked gradients), ``targeted`` (PGD on ``target`` towards targets
picked by ``Attack.target``, see :func:`targets`: every candidate target of the batch in one expanded batch, a
point where the target is greedy preferred to any other, the most preferred candidate the budget reaches
kept).
docs/attacks.md says what each attack maximises for Discrete and for Box policies.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from madistill.attacks.budget import Budget
from madistill.common.divergences import divergence
from madistill.config import TrainingAttack
from madistill.errors import MadistillError
from madistill.policies.base import Policy, choose, log_prob

METHODS = ("random", "fgsm", "pgd", "spsa", "targeted")
OBJECTIVES = ("kl", "ce", "value", "target")
TARGETS = ("random", "lowest")
# The inner adversaries of robust training (distill.adv_objective, finetune.attack_objective, repair.adv_objective):
# untargeted PGD on an objective, or the suite's targeted PGDs of the same names; the config's choice lists them.
TRAINING_ATTACKS = tuple(a.value for a in TrainingAttack)


@dataclass(frozen=True)
class Attack:
    """An attack method with its settings; call it on a policy and a batch of normalised observations."""

    method: str = "pgd"
    objective: str = "kl"
    steps: int = 10  # pgd / spsa iterations
    restarts: int = 3  # pgd / spsa random restarts (the best per sample is kept)
    step_size: float = 1.0  # pgd / spsa first step, in units of the radius (halved per sample when it does not improve)
    spsa_samples: int = 32  # random directions per spsa gradient estimate (each costs two forwards)
    spsa_delta: float = 0.3  # spsa finite-difference scale, in units of the radius (Uesato et al. 2018: ~eps/3)
    target: str = "random"  # targeted: how targets are chosen (see targets())
    candidates: int = 1  # targeted, target lowest on Discrete actions: lowest-ranked actions tried per sample
    # target on Discrete actions: a sample stops at its first point where the target is greedy (all a greedy victim
    # shows); False: it climbs on to the most confident point (robust training learns from the strongest)
    stop_reached: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MadistillError(f"unknown attack method {self.method!r}: use one of {METHODS}")
        if self.objective not in OBJECTIVES:
            raise MadistillError(f"unknown attack objective {self.objective!r}: use one of {OBJECTIVES}")
        if (self.method == "targeted") != (self.objective == "target"):
            raise MadistillError(f"attack method {self.method!r} with objective {self.objective!r}: the target objective "
                                 "needs the targeted method (targeted_random, targeted_lowest), the others take kl, ce or value")
        if self.target not in TARGETS:
            raise MadistillError(f"unknown attack target choice {self.target!r}: use one of {TARGETS}")

    def __call__(
        self,
        policy: Policy,
        x: torch.Tensor,
        budget: Budget,
        generator: torch.Generator | None = None,
        critic: Policy | None = None,
    ) -> torch.Tensor:
        x = x.detach()
        if len(x) == 0 or float(budget.radius.max()) == 0.0:
            return x
        if self.method == "random":
            return budget.sample(x, generator)
        if self.method == "targeted":
            return self._targeted(policy, x, budget, generator)
        goal = Objective(self.objective, policy, x, critic)
        if self.method == "fgsm":
            # A stationary objective's gradient at the clean point is exactly zero (its minimum), so a step
            # along it would return x. Near that minimum f(x + r) ~ r^T H r / 2, whose gradient at a random
            # point r of the ball is H r: one power-iteration step toward the direction of greatest curvature
            # (the virtual adversarial direction of Miyato et al. 2018). FGSM steps from x along its sign.
            at = budget.sample(x, generator) if goal.stationary else x
            return budget.project(x + budget.radius * goal.gradient(at).sign(), x)
        return self._search(goal, x, budget, generator)

    def _search(self, goal: Objective, x: torch.Tensor, budget: Budget, generator: torch.Generator | None) -> torch.Tensor:
        """PGD (SPSA: estimated-gradient) steps on ``goal`` from ``restarts`` random starts; per sample the best point
        visited over all steps and restarts (:meth:`Objective.better`), or ``x`` where none beats it.

        Each step starts from the sample's best point of its restart, along the gradient there, with a size of
        ``step_size`` times the radius, halved whenever a step does not improve that point: a fixed signed step
        oscillates around an optimum inside the ball, a halved one settles on it. A sample whose target is already
        the greedy action (``target`` objective, Discrete) is done (``stop_reached``): it takes no further
        restarts and leaves the steps (:meth:`_restart`), since that is all a greedy victim can show, so the
        budget goes to the samples not yet forced."""
        best = x.clone()
        with torch.no_grad():
            best_val, best_hit = goal.evaluate(x)
        for _ in range(self.restarts):
            rows = (~best_hit if self.stop_reached else torch.ones_like(best_hit)).nonzero()[:, 0]
            if not len(rows):
                break
            at, val, hit = self._restart(goal, x, rows, budget, generator)
            better = goal.better(val, hit, best_val[rows], best_hit[rows])
            best[rows] = torch.where(better[:, None], at, best[rows])
            best_val[rows] = torch.where(better, val, best_val[rows])
            best_hit[rows] |= hit
        return best

    def _restart(self, goal: Objective, x: torch.Tensor, rows: torch.Tensor, budget: Budget,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One restart of :meth:`_search` on the samples ``rows`` of ``x``: their best points, the objective there
        and whether their targets are reached.

        The steps run on a working set of samples. A sample whose target is reached (``stop_reached``) stops
        counting: once at most half of the set still searches, the set shrinks to those (their state written to
        the result first). Until then a reached sample steps along with the others, keeping a reached point: on
        the small batches of an evaluation the extra rows cost less than the indexing that would drop them."""
        out_top, out_val = x[rows].clone(), torch.empty(len(rows), device=x.device, dtype=x.dtype)
        out_hit = torch.zeros(len(rows), dtype=torch.bool, device=x.device)
        idx, x0 = torch.arange(len(rows), device=x.device), x[rows]
        now = goal if len(rows) == len(x) else goal.rows(rows)
        lo, hi = budget.bounds(x0)  # the ball, once per working set rather than every step
        top = at = budget.sample(x0, generator)
        val = torch.full((len(rows),), float("-inf"), device=x.device, dtype=x.dtype)
        hit = torch.zeros(len(rows), dtype=torch.bool, device=x.device)
        grad, stride = torch.zeros_like(top), (self.step_size * budget.radius).expand_as(top)
        stop = goal.reaches and self.stop_reached
        for t in range(self.steps + 1):
            last = t == self.steps  # the last point needs no gradient
            if last or self.method == "spsa":
                with torch.no_grad():
                    v, h = now.evaluate(at)
                g = grad if last else self._spsa_gradient(now, at, budget, generator)
            else:
                v, h, g = now.value_and_gradient(at)
            if goal.reaches:
                better = goal.better(v, h, val, hit)
                hit = hit | h
            else:
                better = v > val
            top, grad = torch.where(better[:, None], at, top), torch.where(better[:, None], g, grad)
            val, stride = torch.where(better, v, val), torch.where(better[:, None], stride, stride / 2)
            if last:
                break
            if stop:
                searching = int((~hit).sum())
                if not searching or 2 * searching <= len(idx):
                    out_top[idx[hit]], out_val[idx[hit]], out_hit[idx[hit]] = top[hit], val[hit], True
                    if not searching:
                        return out_top, out_val, out_hit
                    keep = ~hit
                    idx, lo, hi, top, val, hit, grad, stride = (
                        a[keep] for a in (idx, lo, hi, top, val, hit, grad, stride))
                    now = goal.rows(rows[idx])
            at = torch.clamp(top + stride * grad.sign(), lo, hi)
        out_top[idx], out_val[idx], out_hit[idx] = top, val, hit
        return out_top, out_val, out_hit

    def force(self, policy: Policy, x: torch.Tensor, target: torch.Tensor, budget: Budget,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """PGD (this attack's steps and restarts) inside ``budget`` towards a given ``target`` per sample: an
        action ``[B]`` (Discrete) or a point of the action box ``[B, a]`` (Box). Any target choice realises
        its targets through here."""
        x = x.detach()
        if len(x) == 0 or float(budget.radius.max()) == 0.0:
            return x
        return self._search(Objective("target", policy, x, None, target=target), x, budget, generator)

    def _targeted(self, policy: Policy, x: torch.Tensor, budget: Budget, generator: torch.Generator | None) -> torch.Tensor:
        """PGD towards each sample's candidate targets, all ``K`` candidates in one batch of ``K * B`` rows; per
        sample, the first candidate (in order of preference) whose target becomes the greedy action, else the
        candidate whose target is most likely (closest, for Box) at its returned point."""
        cand = targets(self.target, policy, x, self.candidates, generator)  # [K, B] or [K, B, a]
        k, b = cand.shape[:2]
        flat = cand.reshape(k * b, *cand.shape[2:])
        adv = self.force(policy, x.repeat(k, 1), flat, budget, generator)
        if k == 1:  # one candidate (random targets, Box corners): nothing to choose between
            return adv
        with torch.no_grad():
            head = policy(adv)
            reached = head.argmax(-1) == flat if policy.group.discrete else torch.zeros_like(head[:, 0], dtype=torch.bool)
            reached, val = reached.reshape(k, b), log_prob(policy.dist_from_head(head), flat).reshape(k, b)
        # argmax of a bool tensor gives its first True: the most preferred reached candidate
        pick = torch.where(reached.any(0), reached.to(torch.int8).argmax(0), val.argmax(0))
        return adv.reshape(k, b, -1)[pick, torch.arange(b, device=x.device)]

    def _spsa_gradient(self, goal: Objective, x: torch.Tensor, budget: Budget, gen: torch.Generator | None) -> torch.Tensor:
        """Simultaneous-perturbation estimate: mean over random +-1 directions u of
        (f(x + c u) - f(x - c u)) / (2 c) u, all directions in one batched forward. Function values only, so no
        autograd graph is kept: over 2 x spsa_samples copies of the batch it would hold every layer's activations
        (gigabytes for image policies)."""
        n, (b, d) = self.spsa_samples, x.shape
        u = torch.randint(0, 2, (n, b, d), generator=gen, device=x.device).to(x.dtype) * 2 - 1
        c = self.spsa_delta * budget.radius.clamp_min(1e-6)
        pts = torch.cat([x[None] + c * u, x[None] - c * u]).reshape(2 * n * b, d)
        with torch.no_grad():
            vals = goal(pts, repeat=2 * n).reshape(2, n, b)
        return (((vals[0] - vals[1])[..., None] / (2 * c)) * u).mean(0)


class Objective:
    """The attack objective for clean observations ``x`` (per sample, to maximise).

    ``stationary``: the clean point is the objective's minimum, so its gradient there is exactly zero. True for
    ``kl`` (a divergence from the clean distribution) and for ``ce`` on Box actions (the Gaussian's clean
    mean is its most likely action); ``ce`` on Discrete actions, ``value`` and ``target`` have gradients at the
    clean point. ``target``: per sample, the action (Discrete ``[B]``) or point (Box ``[B, a]``) the ``target``
    objective pulls the policy towards. ``reaches``: a point can reach the goal (``target`` on Discrete actions:
    the target is the greedy action there).
    """

    def __init__(self, name: str, policy: Policy, x: torch.Tensor, critic: Policy | None,
                 target: torch.Tensor | None = None):
        if name == "value" and (critic is None or critic.value(x[:1]) is None):
            raise MadistillError("the critic attack needs a policy with a decentralised value head: set attack.critic=<a "
                                 "teacher run trained with teacher.critic=local>, or leave value out of attack.methods")
        if (name == "target") != (target is not None):
            raise ValueError("the target objective, and only it, needs a target per sample")
        self.name, self.policy, self.critic, self.target = name, policy, critic, target
        self.reaches = name == "target" and policy.group.discrete  # a point where the target is greedy is done
        self.stationary = name == "kl" or (name == "ce" and not policy.group.discrete)
        with torch.no_grad():
            self.clean_head = policy(x)
            self.clean_action = choose(policy.dist_from_head(self.clean_head), True, None)

    def __call__(self, x_adv: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """Objective at ``x_adv``; ``repeat`` > 1 when ``x_adv`` stacks that many copies of the batch."""
        return self.evaluate(x_adv, repeat)[0]

    def evaluate(self, x_adv: torch.Tensor, repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective at ``x_adv`` and, per sample, whether its target is the greedy action there (``target`` on
        Discrete actions; always False otherwise: the other objectives have no point at which they are done)."""
        if self.name == "value":
            value = -self.critic.value(x_adv)  # type: ignore[union-attr]
            return value, torch.zeros_like(value, dtype=torch.bool)
        head = self.policy(x_adv)
        clean = self.clean_head.repeat(repeat, *([1] * (self.clean_head.dim() - 1)))
        none = torch.zeros(len(head), dtype=torch.bool, device=head.device)
        if self.name == "kl":
            log_std = self.policy.log_std()
            return divergence("kl", clean, head, discrete=self.policy.group.discrete,
                              teacher_log_std=log_std, student_log_std=log_std), none
        if self.name == "target":
            # log N(target; mu, sigma) for Box: minus half the squared distance in std units, plus a constant
            target = self.target.repeat(repeat, *([1] * (self.target.dim() - 1)))  # type: ignore[union-attr]
            reached = head.argmax(-1) == target if self.policy.group.discrete else none
            return log_prob(self.policy.dist_from_head(head), target), reached
        action = self.clean_action.repeat(repeat, *([1] * (self.clean_action.dim() - 1)))
        return -log_prob(self.policy.dist_from_head(head), action), none

    def value_and_gradient(self, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`evaluate` at ``x_adv`` and the objective's gradient there, from one forward and backward pass."""
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            value, reached = self.evaluate(x_adv)
            (g,) = torch.autograd.grad(value.sum(), x_adv)
        return value.detach(), reached, g

    def gradient(self, x_adv: torch.Tensor) -> torch.Tensor:
        """The objective's gradient at ``x_adv``."""
        return self.value_and_gradient(x_adv)[2]

    def rows(self, index: torch.Tensor) -> Objective:
        """The same objective for the samples ``index`` of its batch only."""
        sub = copy.copy(self)
        sub.clean_head, sub.clean_action = self.clean_head[index], self.clean_action[index]
        sub.target = None if self.target is None else self.target[index]
        return sub

    @staticmethod
    def better(value: torch.Tensor, reached: torch.Tensor, than: torch.Tensor, than_reached: torch.Tensor) -> torch.Tensor:
        """Per sample, whether a point is better than another: its target reached where the other's is not, else
        (both reached or neither) a higher objective."""
        return (reached & ~than_reached) | ((reached == than_reached) & (value > than))


def targets(choice: str, policy: Policy, x: torch.Tensor, candidates: int = 1,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Candidate targets for the clean observations ``x``, most preferred first: ``[K, B]`` actions (Discrete)
    or ``[K, B, a]`` points (Box). Both choices need only the victim's observation and its policy.

    - ``random``: one uniformly random action other than the greedy one (Box: a uniform point of the action
      box) per sample, the floor of any target choice.
    - ``lowest``: Discrete, the ``candidates`` actions the clean policy ranks lowest (never its greedy one),
      lowest first: what the victim's own policy rates worst, its estimate of the action with the least
      advantage. Box: the corner of the action box farthest from the clean mean (per component, the bound
      on the other side of the box's midpoint).
    """
    group = policy.group
    with torch.no_grad():
        head = policy(x)
    if group.discrete:
        n = int(group.action_space.n)  # type: ignore[attr-defined]
        if n < 2:
            raise MadistillError(f"group {group.name!r} has one action, so no other action to force: leave "
                                 "targeted_* out of attack.methods")
        if choice == "random":  # one of the other n - 1 actions: forcing the greedy one would attack nothing
            r = torch.randint(0, n - 1, (1, len(x)), generator=generator, device=x.device)
            return r + (r >= head.argmax(-1))
        return head.argsort(-1)[:, : min(candidates, n - 1)].T
    low, high = (torch.as_tensor(b, dtype=head.dtype, device=x.device)
                 for b in (group.action_space.low, group.action_space.high))  # type: ignore[attr-defined]
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise MadistillError(f"targeted attacks need a bounded action box, group {group.name!r} has an unbounded one: "
                             "leave targeted_* out of attack.methods")
    if choice == "random":
        u = torch.rand(head.shape, generator=generator, device=x.device, dtype=head.dtype)
        return (low + u * (high - low))[None]
    return torch.where(head > (low + high) / 2, low, high)[None]


def training_attack(name: str, steps: int, candidates: int = 1) -> Attack:
    """The inner adversary robust training crafts its perturbations with, one of :data:`TRAINING_ATTACKS`: PGD with
    ``steps`` steps and one restart (it runs at every update) on ``kl`` or ``ce``, or the suite's
    ``targeted_lowest`` / ``targeted_random`` with those steps (``candidates``: the lowest-ranked actions tried at
    once), so a student trains against the attack that forces a harmful action, not only one that moves its own.
    A forced target is pushed on past the point where it becomes greedy (``stop_reached`` off): the student
    learns from the most confident perturbation the steps find, not one on the decision boundary."""
    if name not in TRAINING_ATTACKS:
        raise MadistillError(f"unknown training attack {name!r}: use one of {TRAINING_ATTACKS}")
    pgd = Attack("pgd", "kl", steps=steps, restarts=1, candidates=candidates, stop_reached=False)
    return replace(pgd, objective=name) if name in ("kl", "ce") else variants(pgd)[name]


def force_targets(policy: Policy, x: torch.Tensor, target: torch.Tensor, budget: Budget, steps: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row of ``x`` perturbed within ``budget`` towards its ``target`` action by the training attack's
    targeted PGD (``steps`` steps; that of targeted_random, whose own target choice is not used): how robust
    training and repair force a target a lookahead recorded on the policy they train."""
    return training_attack("targeted_random", steps).force(policy, x, target, budget, generator)


def variants(pgd: Attack) -> dict[str, Attack]:
    """The gradient and sampling attacks of the suite, all derived from one PGD's settings: ``pgd_strong``
    (2x steps and restarts, for the masking checks), ``critic`` (PGD on a critic's value), ``transfer`` (the
    same PGD, crafted on a surrogate by the caller), ``spsa`` (its steps on estimated gradients), ``fgsm``,
    ``random``, and the targeted PGDs ``targeted_random`` and ``targeted_lowest`` (see :func:`targets`)."""
    return {
        "random": replace(pgd, method="random"),
        "fgsm": replace(pgd, method="fgsm", objective="ce"),
        "pgd": pgd,
        "pgd_strong": replace(pgd, steps=2 * pgd.steps, restarts=2 * pgd.restarts),
        "critic": replace(pgd, objective="value"),
        "spsa": replace(pgd, method="spsa"),
        "transfer": pgd,
        "targeted_random": replace(pgd, method="targeted", objective="target", target="random"),
        "targeted_lowest": replace(pgd, method="targeted", objective="target", target="lowest"),
    }
