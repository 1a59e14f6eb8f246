"""Helpers every capability builds on (divergences, episode statistics, collection, schedules, bootstrap
resampling, atomic writers), below ``evaluate``, ``explain``, ``attacks`` and ``distill``; tests/test_layers.py
holds the layer order."""
