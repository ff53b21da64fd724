"""The package version: one source, the installed distribution's metadata (from pyproject.toml)."""
from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("some")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
