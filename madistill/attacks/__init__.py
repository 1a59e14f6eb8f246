"""Adversarial observation perturbations: budgets, attack methods, the attack transform, masking checks."""
