"""Selective input-gradient regularization (DIGR, Xing et al. 2022).

The student's input gradient is penalised on the features the teacher's perturbation saliency marks as
irrelevant: ``sum_i (1 - m_i(x)) (d f_S(x) / d x_i)^2``, averaged over the batch. Features the teacher relies
on are left free, so the student's gradient saliency concentrates where the teacher's decision actually is.
"""

from __future__ import annotations

import torch

from madistill.config import Mask
from madistill.envs.features import FeatureLayout
from madistill.errors import MadistillError
from madistill.explain.saliency import decision_value
from madistill.policies.base import Policy

MASKS = tuple(Mask)


def relevance_mask(
    saliency: torch.Tensor, layout: FeatureLayout, kind: str = "soft", topk: int = 3, threshold: float = 0.1
) -> torch.Tensor:
    """Per-feature relevance ``m [B, d]`` in [0, 1] from per-group teacher saliency ``[B, G]``.

    ``soft``: m = saliency; ``topk``: 1 on the ``topk`` most salient groups; ``threshold``: 1 where the
    saliency is at least ``threshold``. Each feature takes its group's value.
    """
    if kind == "soft":
        per_group = saliency
    elif kind == "topk":
        k = max(1, min(topk, saliency.shape[1]))
        per_group = torch.zeros_like(saliency).scatter_(1, saliency.topk(k, dim=1).indices, 1.0)
    elif kind == "threshold":
        per_group = (saliency >= threshold).to(saliency.dtype)
    else:
        raise MadistillError(f"unknown mask {kind!r}: use distill.mask=<one of {MASKS}>")
    return per_group @ layout.membership(saliency.device)


def igr_penalty(
    student: Policy,
    obs: torch.Tensor,
    head: torch.Tensor,
    actions: torch.Tensor,
    relevance: torch.Tensor,
    target: str = "log_prob",
) -> torch.Tensor:
    """The selective input-gradient penalty (a scalar, differentiable in the student's parameters).

    ``obs`` must require grad and ``head = student(obs)`` (reused from the distillation loss, so the
    regularised step costs one extra double-backward, not another forward). ``actions`` are the teacher's
    greedy actions whose log-probability (or logit) is ``f_S``.
    """
    f = decision_value(student, head, actions, target)
    (grad,) = torch.autograd.grad(f.sum(), obs, create_graph=True)
    return ((1.0 - relevance) * grad.pow(2)).sum(-1).mean()
