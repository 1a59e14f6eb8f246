"""Teachers: SB3 actor-critic policies behind madistill's Policy interface."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy, BaseFeaturesExtractor
from stable_baselines3.common.torch_layers import MlpExtractor
from torch import nn

from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.policies.base import Policy
from madistill.policies.cnn import ImageFeatures

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU}


def activation(name: str) -> type[nn.Module]:
    """The torch activation class for a config name (``tanh``, ``relu``, ...)."""
    if name not in ACTIVATIONS:
        raise MadistillError(f"unknown activation {name!r}: use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def team_state_dim(arch: dict[str, Any]) -> int:
    """Width of the team's observations a centralised critic reads after the agent's own: 0 for a local
    critic, and for architectures saved before ``teacher.critic`` existed."""
    return int(arch.get("team_state_dim", 0))


def sb3_observation_space(group: AgentGroup, arch: dict[str, Any]) -> spaces.Box:
    """What SB3 sees: the flattened, normalised observation (an unbounded float32 Box), followed by the
    team's observations when the critic is centralised."""
    dim = group.obs_dim + team_state_dim(arch)
    return spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)


class _NoOptimizer:
    """Takes the place of the optimiser SB3 builds into every policy, for policies that only act or lend their
    weights: training gets its own from SB3's PPO (``teacher.build_model``), and the first torch optimiser a
    process builds imports torch's compiler, seconds of a short stage's start-up."""

    def __init__(self, params: Any, lr: float, **kwargs: Any):
        pass


def build_sb3_policy(group: AgentGroup, arch: dict[str, Any]) -> ActorCriticPolicy:
    """A fresh SB3 actor-critic with separate actor and critic MLPs of the given widths, without an optimiser."""
    return sb3_policy_class(arch)(
        sb3_observation_space(group, arch),
        group.action_space,
        lr_schedule=lambda _: 0.0,
        optimizer_class=_NoOptimizer,
        **policy_kwargs(group, arch),
    )


def sb3_policy_class(arch: dict[str, Any]) -> type[ActorCriticPolicy]:
    """SB3's ActorCriticPolicy, or the centralised-critic one (``teacher.critic=central``)."""
    return CentralCriticPolicy if team_state_dim(arch) else ActorCriticPolicy


def policy_kwargs(group: AgentGroup, arch: dict[str, Any]) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` for a madistill architecture: critic (and actor) of ``hidden_sizes``, or an actor of
    ``actor_hidden_sizes`` where given (a student's actor with its teacher's critic, for robust fine-tuning);
    for a group observing images, the CNN encoder of ``cnn`` (``teacher.cnn``) before them, shared by actor and
    critic as in SB3's ``CnnPolicy``."""
    hidden = list(arch["hidden_sizes"])
    actor = list(arch.get("actor_hidden_sizes") or hidden)
    kwargs = {"net_arch": {"pi": actor, "vf": hidden}, "activation_fn": activation(arch["activation"]), "ortho_init": True}
    if team_state_dim(arch):
        kwargs["actor_dim"] = group.obs_dim
    if group.image_shape is not None and arch.get("cnn"):  # architectures from before teacher.cnn have none
        if team_state_dim(arch):
            raise MadistillError(f"group {group.name!r} observes images, which teacher.critic=central cannot join to "
                                 "the team's observations: use teacher.critic=local")
        kwargs["features_extractor_class"] = ImageFeatures
        kwargs["features_extractor_kwargs"] = {"group": group, "cnn": dict(arch["cnn"])}
    return kwargs


class _SplitMlp(nn.Module):
    """SB3's ``mlp_extractor`` interface with an actor that reads the first ``actor_dim`` features (the agent's
    own observation) and a critic that reads them all (its own observation and the team's)."""

    def __init__(self, actor_dim: int, full_dim: int, net_arch: dict[str, list[int]], activation_fn: type[nn.Module],
                 device: torch.device | str):
        super().__init__()
        self.actor_dim = actor_dim
        actor = MlpExtractor(actor_dim, net_arch={"pi": net_arch["pi"], "vf": []}, activation_fn=activation_fn, device=device)
        critic = MlpExtractor(full_dim, net_arch={"pi": [], "vf": net_arch["vf"]}, activation_fn=activation_fn, device=device)
        self.policy_net, self.value_net = actor.policy_net, critic.value_net
        self.latent_dim_pi, self.latent_dim_vf = actor.latent_dim_pi, critic.latent_dim_vf

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        # an actor input of the own observation alone (acting, distillation, attacks) passes unchanged
        return self.policy_net(features[..., : self.actor_dim])

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        return self.value_net(features)


class CentralCriticPolicy(ActorCriticPolicy):
    """SB3 actor-critic for centralised training with decentralised execution (as in MAPPO): the critic sees
    the whole team's observations, the actor only its agent's, so the saved actor acts on its own."""

    def __init__(self, *args: Any, actor_dim: int, **kwargs: Any):
        self.actor_dim = actor_dim
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = _SplitMlp(self.actor_dim, self.features_dim, self.net_arch, self.activation_fn, self.device)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), "actor_dim": self.actor_dim}


class SB3Policy(Policy):
    """Wraps an SB3 ``ActorCriticPolicy``; its actor gives the distribution, its critic the value."""

    kind = "sb3_actor_critic"

    def __init__(self, group: AgentGroup, sb3_policy: ActorCriticPolicy, arch: dict[str, Any]):
        super().__init__()
        self.group = group
        self.sb3 = sb3_policy
        self.arch = dict(arch)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        extractor: BaseFeaturesExtractor = self.sb3.pi_features_extractor
        latent = self.sb3.mlp_extractor.forward_actor(extractor(obs))
        return self.sb3.action_net(latent)

    def log_std(self) -> torch.Tensor | None:
        return None if self.group.discrete else self.sb3.log_std

    @property
    def acting_parameters(self) -> int:
        parts = [self.sb3.pi_features_extractor, self.sb3.mlp_extractor.policy_net, self.sb3.action_net]
        n = sum(p.numel() for m in parts for p in m.parameters())
        return n + (0 if self.group.discrete else self.sb3.log_std.numel())

    def value(self, obs: torch.Tensor) -> torch.Tensor | None:
        """The state value from the agent's own observation; None for a centralised critic, which needs
        the team's observations too (see ``critic_value``)."""
        if isinstance(self.sb3, CentralCriticPolicy):
            return None
        return self.critic_value(obs)

    def critic_value(self, critic_obs: torch.Tensor) -> torch.Tensor:
        """The critic on its full input: the own observation, then the team's (centralised critic)."""
        return self.sb3.predict_values(critic_obs).squeeze(-1)

    @classmethod
    def from_arch(cls, group: AgentGroup, arch: dict[str, Any]) -> SB3Policy:
        return cls(group, build_sb3_policy(group, arch), arch)
