"""Schedules of a training quantity over progress."""

from __future__ import annotations


def linear_ramp(final: float, done: float, ramp: float) -> float:
    """``final`` ramped in over the first ``ramp`` of progress ``done`` (both in one unit: updates, or a share
    of training): linear from 0 to ``final`` at ``done = ramp``, then constant; ``ramp <= 0`` starts at ``final``."""
    return final * (1.0 if ramp <= 0 else min(1.0, done / ramp))
