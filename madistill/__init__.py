"""madistill: distil, attack and explain multi-agent RL teams, and watch failures cascade."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("madistill")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"
