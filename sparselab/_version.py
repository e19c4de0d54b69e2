"""Version of sparselab (from the installed package's metadata: pyproject.toml is its one
source) and of the libraries whose behaviour its numbers depend on."""

from __future__ import annotations

import platform
from importlib import metadata

try:
    __version__ = metadata.version("sparselab")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


def versions() -> dict[str, str]:
    """Versions to store next to every result (so a number can be traced to its setup)."""
    out = {"sparselab": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "numpy", "pandas"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "missing"
    return out
