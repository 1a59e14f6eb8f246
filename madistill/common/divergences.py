"""Distillation divergences between a teacher's and a student's action-head outputs, per sample.

Heads are what ``Policy.forward`` returns: logits (Discrete) or the Gaussian mean (Box, with a
state-independent log-std beside it). Every divergence returns a ``[B]`` tensor so the trainer can weight
or mask samples before averaging.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from madistill.config import Divergence
from madistill.errors import MadistillError

DIVERGENCES = tuple(Divergence)


def divergence(
    name: str,
    teacher: torch.Tensor,
    student: torch.Tensor,
    *,
    discrete: bool,
    temperature: float = 1.0,
    teacher_log_std: torch.Tensor | None = None,
    student_log_std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence ``name`` between teacher and student heads ``[B, n]``, per sample ``[B]``.

    Discrete (``p_T = softmax(z_T / temperature)``, ``p_S = softmax(z_S)``, as in Rusu et al. 2015):
    ``kl`` = KL(p_T || p_S); ``reverse_kl`` = KL(p_S || p_T); ``prob_l2`` = ||p_T - p_S||^2 (the Bregman
    divergence of the squared L2 norm); ``logit_mse`` = mean_j (z_S - z_T)^2 (temperature unused);
    ``nll`` = -log p_S(argmax z_T).

    Box (diagonal Gaussians; the temperature scales the teacher's variance): ``kl`` / ``reverse_kl`` are the
    closed-form Gaussian KLs summed over action dimensions, ``prob_l2`` and ``logit_mse`` the mean squared
    error between means, ``nll`` = -log N(mu_T; mu_S, sigma_S).
    """
    if name not in DIVERGENCES:
        raise MadistillError(f"unknown divergence {name!r}: use distill.divergence=<one of {', '.join(DIVERGENCES)}>")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    teacher = teacher.detach()
    if discrete:
        return _DISCRETE[name](teacher, student, temperature)
    if teacher_log_std is None or student_log_std is None:
        raise ValueError("Box-action divergences need teacher_log_std and student_log_std")
    t_log_std = teacher_log_std.detach() + 0.5 * torch.log(torch.as_tensor(temperature, dtype=teacher.dtype))
    return _GAUSSIAN[name](teacher, t_log_std.expand_as(teacher), student, student_log_std.expand_as(student))


def check_divergence(name: str, discrete: bool) -> None:
    """Run divergence ``name`` once on a pair of unit heads for Discrete (``discrete``) or Box actions, so one
    without a form for those actions (an entry of ``_GAUSSIAN`` that refuses Box actions, docs/extending.md) says
    so before any collection or training, not at the first update."""
    head = torch.zeros(1, 2)
    spread = None if discrete else head
    divergence(name, head, head.clone(), discrete=discrete, teacher_log_std=spread, student_log_std=spread)


def _kl_categorical(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


_Discrete = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
_DISCRETE: dict[str, _Discrete] = {
    "kl": lambda t, s, tau: _kl_categorical(F.log_softmax(t / tau, -1), F.log_softmax(s, -1)),
    "reverse_kl": lambda t, s, tau: _kl_categorical(F.log_softmax(s, -1), F.log_softmax(t / tau, -1)),
    "prob_l2": lambda t, s, tau: (F.softmax(t / tau, -1) - F.softmax(s, -1)).pow(2).sum(-1),
    "logit_mse": lambda t, s, tau: (s - t).pow(2).mean(-1),
    "nll": lambda t, s, tau: F.cross_entropy(s, t.argmax(-1), reduction="none"),
}


def _gaussian_kl(mu_p: torch.Tensor, ls_p: torch.Tensor, mu_q: torch.Tensor, ls_q: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_p, e^ls_p) || N(mu_q, e^ls_q)), summed over the last dimension."""
    var_p, var_q = (2 * ls_p).exp(), (2 * ls_q).exp()
    return (ls_q - ls_p + (var_p + (mu_p - mu_q).pow(2)) / (2 * var_q) - 0.5).sum(-1)


def _gaussian_nll(mu_t: torch.Tensor, mu_s: torch.Tensor, ls_s: torch.Tensor) -> torch.Tensor:
    """-log N(mu_T; mu_S, sigma_S), summed over the last dimension."""
    return (ls_s + 0.5 * ((mu_t - mu_s) / ls_s.exp()).pow(2) + 0.5 * torch.log(torch.tensor(2 * torch.pi))).sum(-1)


def _mean_squared(mu_t: torch.Tensor, mu_s: torch.Tensor) -> torch.Tensor:
    return (mu_s - mu_t).pow(2).mean(-1)


# Box heads (teacher mean, teacher log-std, student mean, student log-std) -> per sample; one entry per
# divergence, as in _DISCRETE, so a name without a Box form fails instead of falling back to another.
_Gaussian = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_GAUSSIAN: dict[str, _Gaussian] = {
    "kl": lambda mu_t, ls_t, mu_s, ls_s: _gaussian_kl(mu_t, ls_t, mu_s, ls_s),
    "reverse_kl": lambda mu_t, ls_t, mu_s, ls_s: _gaussian_kl(mu_s, ls_s, mu_t, ls_t),
    "prob_l2": lambda mu_t, ls_t, mu_s, ls_s: _mean_squared(mu_t, mu_s),  # both reduce to matching the means
    "logit_mse": lambda mu_t, ls_t, mu_s, ls_s: _mean_squared(mu_t, mu_s),
    "nll": lambda mu_t, ls_t, mu_s, ls_s: _gaussian_nll(mu_t, mu_s, ls_s),
}
