"""reslab's version, as installed."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    """reslab's version, from the installed package metadata ("unknown" when run from a bare source tree)."""
    try:
        return metadata.version("reslab")
    except metadata.PackageNotFoundError:
        return "unknown"
