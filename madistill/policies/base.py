"""The one policy interface every stage is written against, and the team that maps agents to it."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal, Uniform

from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies.cnn import ImageEncoder

log = logging.getLogger(__name__)


class Policy(nn.Module, ABC):
    """A group's policy: normalised observations ``[B, obs_dim]`` in, an action distribution out.

    ``forward`` returns the differentiable action-head output (logits for Discrete actions, the mean for
    Box actions), so attacks and saliency can take gradients with respect to the observation.
    """

    group: AgentGroup

    @abstractmethod
    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, n]`` (Discrete) or mean ``[B, a]`` (Box)."""

    def log_std(self) -> torch.Tensor | None:
        """State-independent log standard deviation for Box actions; None for Discrete."""
        return None

    def dist(self, obs: torch.Tensor) -> Distribution:
        """The action distribution: Categorical (Discrete) or diagonal Normal (Box)."""
        return self.dist_from_head(self(obs))

    def dist_from_head(self, head: torch.Tensor) -> Distribution:
        """The distribution for an already computed ``forward`` output (saves a second forward pass)."""
        # torch's per-call argument checks are off (the heads come from this policy, so they would only cost
        # time); the one that matters stays: NaN/inf outputs would otherwise become a silent "always action 0"
        # under greedy argmax
        if not bool(torch.isfinite(head).all()):
            raise MadistillError(
                f"the {self.group.name!r} policy returned NaN/inf outputs: its weights are damaged or its training "
                "diverged (lower the learning rate, or use another run)"
            )
        if self.group.discrete:
            return Categorical(logits=head, validate_args=False)
        log_std = self.log_std()
        assert log_std is not None, "Box-action policies must define log_std()"
        return Normal(head, log_std.exp().expand_as(head), validate_args=False)

    def act(
        self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Sampled (or greedy/mean) actions for a batch."""
        return choose(self.dist(obs), deterministic, generator)

    def value(self, obs: torch.Tensor) -> torch.Tensor | None:
        """State value ``[B]`` where the policy has a critic (teachers), else None."""
        return None

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def acting_parameters(self) -> int:
        """Parameters needed to act (a teacher's critic excluded): what a student's size is compared to."""
        return self.num_parameters


def warn_if_large(policy: Policy, role: str, limit: int) -> None:
    """Before training: one warning line when ``policy`` has more than ``limit`` parameters (``warn_parameters``),
    naming the count, the layer that holds most of them and the ``role`` setting (``teacher``, ``student``) that
    shrinks it. Such a network trains slowly and writes a checkpoint of 4 bytes a parameter."""
    n = policy.num_parameters
    linears = [m for m in policy.modules() if isinstance(m, nn.Linear)]
    if n <= limit or not linears:
        return
    widest = max(linears, key=lambda m: m.weight.numel())
    g = policy.group
    if any(widest is e.linear[0] for e in policy.modules() if isinstance(e, ImageEncoder)):
        cause = f"its CNN's linear layer reads {widest.in_features:,} values of the pooled feature map"
        fix = f"lower {role}.cnn.max_grid, {role}.cnn.channels[-1] or {role}.cnn.features_dim"
    elif widest.in_features == g.obs_dim:
        cause = f"its first layer reads a flattened observation of {g.obs_dim:,} features"
        fix = (f"lower {role}.hidden_sizes, or give the env image observations (a uint8 Box (H, W, C) in 0..255) "
               "so that a CNN encodes them")
    else:
        cause = f"its largest layer maps {widest.in_features:,} to {widest.out_features:,} features"
        fix = f"lower {role}.hidden_sizes"
    log.warning(f"the {role} network of group {g.name!r} has {n:,} parameters ({policy.acting_parameters:,} to act): "
                f"{cause}; {fix} (warn_parameters={limit:,} sets this warning's threshold)")


def log_prob(dist: Distribution, actions: torch.Tensor) -> torch.Tensor:
    """Log-probability per sample (summed over Box action components)."""
    lp = dist.log_prob(actions)
    return lp.sum(-1) if isinstance(dist, Normal) else lp


class TeamPolicy(nn.Module):
    """Maps agent -> group -> Policy, with each group's observation normaliser."""

    def __init__(self, groups: list[AgentGroup], policies: dict[str, Policy], normalizers: dict[str, ObsNormalizer]):
        super().__init__()
        self.groups = list(groups)
        self.policies = nn.ModuleDict(policies)
        self.normalizers = dict(normalizers)
        self.group_of = {a: g.name for g in groups for a in g.agents}
        self._device: torch.device | None = None

    def __getitem__(self, group: str) -> Policy:
        return self.policies[group]  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        # Cached: rollouts ask every step, and finding it walks the module tree.
        if self._device is None:
            self._device = next(self.parameters()).device
        return self._device

    def _apply(self, fn, *args, **kwargs):  # every .to()/.cuda()/.cpu() comes through here
        self._device = None
        return super()._apply(fn, *args, **kwargs)


Generators = torch.Generator | Sequence[torch.Generator] | None


def choose(dist: Distribution, deterministic: bool, generator: Generators) -> torch.Tensor:
    """The greedy action (argmax / mean) or a seeded sample: the one place actions are picked."""
    if not deterministic:
        return sample(dist, generator)
    return dist.probs.argmax(-1) if isinstance(dist, Categorical) else dist.mean


def greedy_actions(policy: Policy, x: torch.Tensor) -> torch.Tensor:
    """The policy's greedy actions on policy-ready (normalised) observations ``x``, without gradients."""
    with torch.no_grad():
        return choose(policy.dist(x), deterministic=True, generator=None)


def sample(dist: Distribution, generator: Generators) -> torch.Tensor:
    """Draw from a Categorical or Normal with an explicit generator (torch's ``sample`` takes none),
    so a rollout's randomness depends only on its seed. A sequence of generators splits the batch into
    as many equal consecutive chunks (one env copy's agents each), each drawn from its own stream.

    Each chunk's noise is written in place into one tensor for the batch (one in-place fill per chunk and
    nothing else per chunk: a rollout of thousands of copies calls this every step), and the arithmetic runs
    once over the whole batch, elementwise, so every chunk gets the numbers torch gives it alone: a Categorical
    is torch's own one-sample ``multinomial`` (exponential noise ``q``, then ``argmax(p / q)``), a Normal
    ``mean + std * randn``, a box's Uniform ``low + (high - low) * rand``."""
    chunked = generator is not None and not isinstance(generator, torch.Generator)
    streams = list(generator) if chunked else [generator]  # type: ignore[arg-type]
    if isinstance(dist, Categorical):
        # a Categorical of a chunk's rows would normalise the normalised logits once more; torch computes each
        # row alike whatever the batch, so normalising the whole batch once more gives every chunk its own
        probs = Categorical(logits=dist.logits, validate_args=False).probs if chunked else dist.probs
        if not torch.isfinite(probs).all():  # torch.multinomial's check, which argmax would not make
            raise ValueError("cannot sample actions: the policy's action probabilities are not finite")
        q = _noise(probs, streams, lambda chunk, g: chunk.exponential_(generator=g))
        return (probs / q).argmax(-1)
    if isinstance(dist, Normal):
        return dist.mean + dist.stddev * _noise(dist.mean, streams, lambda chunk, g: chunk.normal_(generator=g))
    if isinstance(dist, Independent) and isinstance(dist.base_dist, Uniform):
        low, high = dist.base_dist.low, dist.base_dist.high
        return low + (high - low) * _noise(low, streams, lambda chunk, g: chunk.uniform_(generator=g))
    if chunked:
        raise TypeError(f"per-copy sampling streams do not support {type(dist).__name__}")
    return dist.sample()


def _noise(like: torch.Tensor, streams: Sequence[torch.Generator | None],
           fill: Callable[[torch.Tensor, torch.Generator | None], object]) -> torch.Tensor:
    """A tensor shaped as ``like`` whose equal consecutive chunks of rows, one per stream, are each filled in
    place by ``fill(chunk, stream)``: the numbers a fresh tensor of the chunk's shape gets from that stream."""
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    for chunk, g in zip(out.split(like.shape[0] // len(streams)), streams):
        fill(chunk, g)
    return out
