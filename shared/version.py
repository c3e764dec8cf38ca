"""Tandem's own version: the installed package's, as servers report it and files record it."""

from __future__ import annotations

from importlib import metadata

SOURCE_TREE_VERSION = "0.1.0"  # pyproject.toml's, for a source tree that is not installed


def tandem_version() -> str:
    try:
        return metadata.version("tandem")
    except metadata.PackageNotFoundError:
        return SOURCE_TREE_VERSION
