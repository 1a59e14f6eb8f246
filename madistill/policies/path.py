"""The acting path of an MLP policy: its Linear + activation layers from the normalised observation to the head.

Explanation (relevance propagation, the randomisation check) and repair (neuron scores, masks) both work on this
path, so both read it from here: a student without a CNN, or an SB3 teacher whose features extractor only
flattens, has one; any other policy is refused in one line naming the caller and its fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from stable_baselines3.common.torch_layers import FlattenExtractor
from torch import nn

from madistill.errors import MadistillError
from madistill.policies.base import Policy
from madistill.policies.mlp import MLPPolicy
from madistill.policies.sb3 import ACTIVATIONS, SB3Policy


@dataclass(frozen=True)
class Layer:
    """A hidden layer: the ``Linear`` computing its units' inputs and the activation module whose output the
    units are; ``name``: the Linear's name among the policy's parameters (``<name>.weight``, ``<name>.bias``)."""

    linear: nn.Linear
    act: nn.Module
    name: str


@dataclass(frozen=True)
class ActingPath:
    """The hidden layers (input first), the output ``Linear`` and that Linear's parameter name."""

    hidden: list[Layer]
    head: nn.Linear
    head_name: str

    @property
    def modules(self) -> list[nn.Module]:
        """Every layer in order, as one sequence: Linear, activation, ..., output Linear."""
        return [m for layer in self.hidden for m in (layer.linear, layer.act)] + [self.head]


def acting_path(policy: Policy, needed_by: str, fix: str) -> ActingPath:
    """``policy``'s acting path. A policy without one (a CNN encoder, a features extractor that does more than
    flatten, layers other than Linear + activation) gets a MadistillError saying that ``needed_by`` needs an MLP
    policy, and the ``fix``."""
    if isinstance(policy, MLPPolicy) and policy.encoder is None:
        prefix, modules = "net", list(policy.net)
        head_name = f"net.{len(modules) - 1}"
    elif isinstance(policy, SB3Policy) and isinstance(policy.sb3.pi_features_extractor, FlattenExtractor):
        prefix, modules = "sb3.mlp_extractor.policy_net", [*policy.sb3.mlp_extractor.policy_net, policy.sb3.action_net]
        head_name = "sb3.action_net"
    else:
        modules = []
    body, head = modules[:-1], modules[-1] if modules else None
    pairs = list(zip(body[0::2], body[1::2]))
    if (not isinstance(head, nn.Linear) or len(body) % 2
            or not all(isinstance(lin, nn.Linear) and isinstance(act, tuple(ACTIVATIONS.values())) for lin, act in pairs)):
        raise MadistillError(f"{needed_by} needs an MLP policy; the {policy.group.name!r} policy "
                             f"({type(policy).__name__}) is not one: {fix}")
    hidden = [Layer(lin, act, f"{prefix}.{2 * i}") for i, (lin, act) in enumerate(pairs)]
    return ActingPath(hidden, head, head_name)
