"""Environments for madistill.

``envs.relay`` provides the ``relay_v0`` PettingZoo ParallelEnv, ``envs.pixels`` the ``pixels_v0`` one (image
observations).
"""

from envs import pixels, relay

__all__ = ["pixels", "relay"]
