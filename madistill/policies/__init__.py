"""Policies: the shared interface, SB3 teachers, MLP students, and the on-disk policy store."""

from madistill.policies.base import Policy, TeamPolicy
from madistill.policies.mlp import MLPPolicy
from madistill.policies.sb3 import SB3Policy
from madistill.policies.uniform import UniformPolicy

POLICY_CLASSES: dict[str, type[Policy]] = {
    SB3Policy.kind: SB3Policy,
    MLPPolicy.kind: MLPPolicy,
    UniformPolicy.kind: UniformPolicy,
}

__all__ = ["POLICY_CLASSES", "MLPPolicy", "Policy", "SB3Policy", "TeamPolicy", "UniformPolicy"]
