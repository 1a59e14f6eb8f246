"""What a masked fine-tune fits on failures (its failure term), and how a fine-tune is judged on held-out data.

Every term is asked for its loss at each step of :func:`madistill.repair.masked.masked_finetune`, which adds the
clean anchor; each is built once for the training part of the data and once for the held-out part:

- :class:`FixedFailures`: the failure set built on the original (attack flips or a user file), cross-entropy to
  the wanted action; judged by the held-out failures' share acting as wanted;
- :class:`RebuiltFailures`: adversarial repair, the failures rebuilt by a training attack on the policy being
  tuned every ``every`` steps; judged by robust accuracy under a fresh attack;
- :class:`ForcedTargets`: states the suite's lookahead drove the policy to, each with the harmful action it
  forced there, trained with robust distillation's loss (the original's clean head as the target on clean and
  adversarial points, the adversarial point per sample the worse of PGD and the recorded target forced anew on
  the policy being tuned); judged by the share of held-out states that keep the original's action with their
  target forced on the tuned policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from madistill.attacks.budget import Budget
from madistill.attacks.methods import force_targets
from madistill.distill.dataset import GroupData
from madistill.distill.loss import DistillLoss
from madistill.envs.features import FeatureLayout
from madistill.policies.base import Policy, greedy_actions
from madistill.repair.failures import Adversary, FailureSet
from madistill.repair.neurons import failure_loss


class FailureTerm(Protocol):
    """The failure term of a masked fine-tune."""

    def loss(self, tuned: Policy, step: int, batch_size: int, gen: torch.Generator,
             attack_gen: torch.Generator) -> torch.Tensor | None:
        """The term at fine-tuning step ``step`` (minibatches drawn from ``gen``, attacks' random starts from
        ``attack_gen``); None when there is nothing to fit this step."""

    def accuracy(self, original: Policy, tuned: Policy, seed: int) -> float:
        """On held-out data: the share on which ``tuned`` acts as the repair wants."""


@dataclass
class FixedFailures:
    """Failing observations and their wanted actions, fixed before the fine-tune."""

    failures: FailureSet

    def loss(self, tuned: Policy, step: int, batch_size: int, gen: torch.Generator,
             attack_gen: torch.Generator) -> torch.Tensor | None:
        f = self.failures
        if not len(f):
            return None
        i = torch.randint(len(f), (batch_size,), generator=gen).to(f.x.device)
        return failure_loss(tuned, f.x[i], f.wanted[i]).mean()

    def accuracy(self, original: Policy, tuned: Policy, seed: int) -> float:
        return float((greedy_actions(tuned, self.failures.x) == self.failures.wanted).float().mean())


@dataclass
class RebuiltFailures:
    """Adversarial repair: every ``adversary.every`` steps the failures are those ``adversary``'s training attack
    finds on the policy being tuned from the clean observations ``clean`` (wanting the original's greedy action
    there), so the fine-tune fits the failures it has, not the original's."""

    adversary: Adversary
    clean: torch.Tensor
    wanted: torch.Tensor

    def __post_init__(self) -> None:
        self._found = FailureSet(self.clean[:0], self.wanted[:0], "training attack")

    def loss(self, tuned: Policy, step: int, batch_size: int, gen: torch.Generator,
             attack_gen: torch.Generator) -> torch.Tensor | None:
        if step % self.adversary.every == 0:
            self._found = self.adversary.failures(tuned, self.clean, self.wanted, attack_gen)
        return FixedFailures(self._found).loss(tuned, step, batch_size, gen, attack_gen)

    def accuracy(self, original: Policy, tuned: Policy, seed: int) -> float:
        """Robust accuracy: the share of ``clean`` on which ``tuned`` keeps the wanted action under the
        adversary's fresh check attack crafted on it, because an adversarial repair is asked to resist the attack
        on itself, not the failures the original had."""
        return self.adversary.robust_accuracy(tuned, self.clean, self.wanted, seed)


@dataclass
class ForcedTargets:
    """States ``data.obs`` (normalised clean observations) with the original's clean head ``data.teacher_head``
    and, where the lookahead forced one, its target ``data.target`` (-1 elsewhere), fitted with ``objective``
    (robust distillation's loss) inside ``budget``."""

    data: GroupData
    objective: DistillLoss
    layout: FeatureLayout
    budget: Budget

    def loss(self, tuned: Policy, step: int, batch_size: int, gen: torch.Generator,
             attack_gen: torch.Generator) -> torch.Tensor | None:
        i = torch.randint(len(self.data), (batch_size,), generator=gen).to(self.data.obs.device)
        return self.objective(tuned, self.data.select(i), self.layout, None, self.budget, attack_gen)["total"]

    def accuracy(self, original: Policy, tuned: Policy, seed: int) -> float:
        """The share of the states with a target on which ``tuned``, with that target forced on it (targeted PGD,
        the objective's steps), still takes the original's greedy clean action."""
        rows = (self.data.target >= 0).nonzero().flatten()
        if not len(rows):
            return float("nan")
        x = self.data.obs[rows]
        gen = torch.Generator(device=x.device).manual_seed(seed)
        forced = force_targets(tuned, x, self.data.target[rows], self.budget, self.objective.adv_steps, gen)
        return float((greedy_actions(tuned, forced) == greedy_actions(original, x)).float().mean())


def targeted_data(original: Policy, obs: torch.Tensor, target: torch.Tensor) -> GroupData:
    """``obs`` (normalised) labelled with ``original``'s clean head and the forced ``target`` per row (-1: none),
    in the layout robust distillation's loss reads (no saliency: the DIGR penalty is not part of a repair)."""
    n = len(obs)
    with torch.no_grad():
        head = original(obs)
    return GroupData(obs, head, torch.ones(n, 1, device=obs.device), torch.zeros(n, device=obs.device),
                     torch.zeros(n, dtype=torch.bool, device=obs.device), target)

