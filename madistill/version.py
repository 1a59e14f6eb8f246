"""The installed package version, which saved policies record (imported by the store without the package's
public entry points)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("madistill")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"
