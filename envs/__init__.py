"""Environments for madistill.

``envs.relay`` provides the ``relay_v0`` PettingZoo ParallelEnv.
"""

from envs import relay

__all__ = ["relay"]
