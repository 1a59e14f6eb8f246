"""Intrinsic rewards a teacher group may add to its environment reward (``teacher.message_bonus``).

Emergent communication gets stuck when a speaker sends one message for two meanings: the listener cannot tell
them apart, so it learns nothing from a message the speaker rarely tries, and the speaker gains nothing by
trying it (Eccles et al. 2019, "Biases for emergent communication in multi-agent RL"). Their positive-signalling
bias rewards a speaker for using its whole vocabulary; here that is a reward for each action's surprise under
the group's average policy, ``-log pbar(a) - H(pbar)``: rarely used actions earn it, common ones pay it, and
its mean under ``pbar`` is zero, so once every message is used equally often it vanishes and the task reward
alone decides what each message means. The environment's reward, which the episode returns report, is left
unchanged.
"""

from __future__ import annotations

import torch
from torch.distributions import Categorical, Distribution


class MarginalEntropyBonus:
    """Per-step bonus ``coef * (-log pbar(a) - H(pbar))`` for a group with a ``Discrete`` action space.

    ``pbar`` is a running average of the group's action probabilities over its active agents, with a memory of
    about ``horizon`` steps (one rollout: it follows the policy as PPO changes it).
    """

    def __init__(self, coef: float, n_actions: int, horizon: int, floor: float = 1e-4):
        self.coef = float(coef)
        self.decay = 1.0 - 1.0 / max(1, int(horizon))
        self.floor = floor  # keeps the bonus of a never-used action finite
        self.marginal = torch.full((n_actions,), 1.0 / n_actions)

    def __call__(self, dist: Distribution, actions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The bonus for each entry of ``actions`` (flat, as ``active``); zero where the agent is inactive."""
        if not isinstance(dist, Categorical):
            raise TypeError("the marginal-entropy bonus needs a Discrete action space")
        probs = dist.probs.reshape(-1, self.marginal.numel()).detach().cpu()
        mask = active.reshape(-1).cpu()
        if mask.any():
            self.marginal = self.decay * self.marginal + (1.0 - self.decay) * probs[mask].mean(0)
        log_p = self.marginal.clamp_min(self.floor).log()
        bonus = self.coef * (-log_p[actions.reshape(-1).long().cpu()] - self.entropy())
        return torch.where(mask, bonus, torch.zeros_like(bonus))

    def entropy(self) -> float:
        """Entropy of the running average policy (log n when every action is used equally often)."""
        return float(-(self.marginal * self.marginal.clamp_min(self.floor).log()).sum())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"marginal": self.marginal.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.marginal = state["marginal"].detach().cpu().clone()
