"""Explainability: saliency methods and explanation-quality metrics."""
