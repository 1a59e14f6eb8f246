"""Neuron localisation and gradient-masked repair (``madistill repair``, docs/repair.md).

``failures``: the observations a policy fails on and the actions it should take; ``neurons``: the hidden units of
an MLP policy, their scores for a failure and their ablation; ``masked``: fine-tuning under a parameter mask that
leaves every other parameter bit-identical, and the update as its support; ``plan``: one repair with its baselines.
"""
