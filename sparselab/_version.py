"""Version of sparselab and of the libraries whose behaviour its numbers depend on."""

from __future__ import annotations

import platform
from importlib import metadata

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """Versions to store next to every result (so a number can be traced to its setup)."""
    out = {"sparselab": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "numpy", "pandas"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "missing"
    return out
