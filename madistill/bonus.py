"""Intrinsic rewards a teacher group may add to its environment reward (``teacher.message_bonus``).

Emergent communication gets stuck when a speaker sends one message for two meanings: the listener cannot tell
them apart, so it learns nothing from a message the speaker rarely tries, and the speaker gains nothing by
trying it. Eccles et al. 2019 ("Biases for emergent communication in multi-agent RL") bias the speaker toward
*positive signalling*: a high mutual information between what it observes and what it sends. Here that is a
reward, the pointwise mutual information of each action, ``log pi(a|s) - log pbar(a)`` with ``pbar`` the group's
average policy: its expectation is I(S; A), and a policy gradient on it is the gradient of I(S; A) = H(pbar) -
E_s H(pi(.|s)), which pays for using the whole vocabulary (the first term) and for each message meaning one
thing (the second). The environment's reward, which episode returns report, is left unchanged.
"""

from __future__ import annotations

import torch
from torch.distributions import Categorical, Distribution


class MutualInformationBonus:
    """Per-step bonus ``coef * (log pi(a|s) - log pbar(a))`` for a group with a ``Discrete`` action space.

    ``pbar`` is a running average of the group's action probabilities over its active agents, with a memory of
    about ``horizon`` steps (one rollout: it follows the policy as PPO changes it).
    """

    def __init__(self, coef: float, n_actions: int, horizon: int, floor: float = 1e-4):
        self.coef = float(coef)
        self.decay = 1.0 - 1.0 / max(1, int(horizon))
        self.floor = floor  # keeps the log of a never-taken action finite
        self.marginal = torch.full((n_actions,), 1.0 / n_actions)

    def __call__(self, dist: Distribution, actions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The bonus for each entry of ``actions`` (flat, as ``active``); zero where the agent is inactive."""
        if not isinstance(dist, Categorical):
            raise TypeError("the message bonus needs a Discrete action space")
        probs = dist.probs.reshape(-1, self.marginal.numel()).detach().cpu()
        mask = active.reshape(-1).cpu()
        if mask.any():
            self.marginal = self.decay * self.marginal + (1.0 - self.decay) * probs[mask].mean(0)
        a = actions.reshape(-1).long().cpu()
        log_pi = probs.gather(1, a[:, None])[:, 0].clamp_min(self.floor).log()
        bonus = self.coef * (log_pi - self.marginal.clamp_min(self.floor).log()[a])
        return torch.where(mask, bonus, torch.zeros_like(bonus))

    def entropy(self) -> float:
        """Entropy of the running average policy (log n when every action is used equally often)."""
        return float(-(self.marginal * self.marginal.clamp_min(self.floor).log()).sum())

    def state_dict(self) -> dict[str, torch.Tensor | float]:
        return {"marginal": self.marginal.clone(), "coef": self.coef}

    def load_state_dict(self, state: dict[str, torch.Tensor | float]) -> None:
        """Take the running average of ``state_dict()`` (the coefficient stays this bonus's own)."""
        self.marginal = torch.as_tensor(state["marginal"]).detach().cpu().clone()
