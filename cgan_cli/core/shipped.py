"""Where the shipped generators are, in a source checkout and in an installed wheel alike (torch-free)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_WEIGHTS_NAME = "cgan-rgb-default.safetensors"
SHIPPED_PACKAGE = "cgan_cli.weights"  # the repo's weights/ folder, installed as package data (pyproject.toml)


def shipped_weights_dir() -> Path:
    """The installed package data, or weights/ of a source checkout run without installing."""
    try:
        root = resources.files(SHIPPED_PACKAGE)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "weights"
    if isinstance(root, Path):
        return root
    # weights/ has no __init__.py, so an installed wheel makes it a namespace package, whose
    # files() is a MultiplexedPath (str() of it is its repr, not a path): take its one folder.
    return Path(root.joinpath(DEFAULT_WEIGHTS_NAME)).parent


def default_weights() -> Path | None:
    """The shipped default generator, or None when this installation has none."""
    path = shipped_weights_dir() / DEFAULT_WEIGHTS_NAME
    return path if path.is_file() else None
