"""CNN encoders for image observations, shared by SB3 teachers (as their features extractor) and students.

Every stage hands policies flat observations ``[B, obs_dim]`` (attacks, saliency and the buffers all work per
feature), so an encoder reshapes each row back into its image, channels first as torch's convolutions want
(SB3's ``VecTransposeImage`` does the same for channel-last envs). The pixels arrive already scaled to [0, 1]
by the group's fixed normaliser (``ObsNormalizer.for_group``), as SB3's ``preprocess_obs`` scales them.

The architecture follows SB3's ``NatureCNN`` (unpadded convolutions with ReLU, then a linear layer with ReLU),
with one addition: the last feature map is average-pooled to at most ``max_grid x max_grid`` cells, so the
linear layer, which holds most of the weights, does not grow with the image (on Atari's 84x84 frames the map
is 7x7 and NatureCNN is unchanged).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError


class ImageEncoder(nn.Module):
    """Flat image observations ``[B, obs_dim]`` (normalised to [0, 1]) to features ``[B, features_dim]``.

    ``cnn``: ``channels``, ``kernels``, ``strides`` (one entry per convolution), ``max_grid`` and
    ``features_dim``, as in ``teacher.cnn`` / ``student.cnn``; ``setting`` names that config node in errors.
    """

    def __init__(self, group: AgentGroup, cnn: dict[str, Any], setting: str):
        super().__init__()
        if group.image_shape is None:
            raise MadistillError(f"group {group.name!r} does not observe images ({group.observation_space}): "
                                 f"{setting} applies to uint8 Box observations of three dimensions in 0..255")
        convs = [(int(o), int(k), int(s)) for o, k, s in zip(cnn["channels"], cnn["kernels"], cnn["strides"])]
        self.channels_first = group.channels_first
        self.image_shape = group.image_shape
        c, h, w = group.image_shape
        layers: list[nn.Module] = []
        for i, (out, k, s) in enumerate(convs):
            if min(h, w) < k:
                raise MadistillError(
                    f"group {group.name!r}: its {group.image_shape[1]}x{group.image_shape[2]} images shrink to {h}x{w} "
                    f"before convolution {i} of {setting} ({k}x{k} kernel): lower {setting}.kernels or {setting}.strides")
            layers += [nn.Conv2d(c, out, k, s), nn.ReLU()]
            c, h, w = out, (h - k) // s + 1, (w - k) // s + 1
        grid = (min(h, int(cnn["max_grid"])), min(w, int(cnn["max_grid"])))
        if grid != (h, w):
            layers.append(nn.AdaptiveAvgPool2d(grid))
        layers.append(nn.Flatten())
        self.cnn = nn.Sequential(*layers)
        self.features_dim = int(cnn["features_dim"])
        self.linear = nn.Sequential(nn.Linear(c * grid[0] * grid[1], self.features_dim), nn.ReLU())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        c, h, w = self.image_shape
        if self.channels_first:
            images = obs.reshape(-1, c, h, w)
        else:
            images = obs.reshape(-1, h, w, c).permute(0, 3, 1, 2)
        return self.linear(self.cnn(images))


class ImageFeatures(BaseFeaturesExtractor):
    """SB3 features extractor of a teacher whose group observes images: an :class:`ImageEncoder` on SB3's
    flat observation space (madistill's normalised, flattened observations)."""

    def __init__(self, observation_space: gym.Space, group: AgentGroup, cnn: dict[str, Any]):
        super().__init__(observation_space, int(cnn["features_dim"]))
        self.encoder = ImageEncoder(group, cnn, "teacher.cnn")

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.encoder(observations)
