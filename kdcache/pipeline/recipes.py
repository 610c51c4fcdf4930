"""The configs kdcache ships: YAML files inside the package, in ``kdcache/configs/`` (``demo.yaml``,
``debug.yaml``, ``kd.yaml``) and ``kdcache/configs/recipes/`` (``--recipe NAME``).

They are found through importlib.resources, so an installed wheel reads them exactly as a checkout does
(where ``configs/`` is a symlink to ``kdcache/configs`` for people and docs). This module is the one place
that knows where they live.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.resources
from pathlib import Path
from typing import TYPE_CHECKING

from kdcache.errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

CONFIGS: Traversable = importlib.resources.files("kdcache") / "configs"

# Resources that are not plain files (a zipped install) are extracted once and removed at exit.
_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def _recipes_dir() -> Traversable:
    return CONFIGS / "recipes"


def _on_disk(resource: Traversable) -> Path:
    """A filesystem path for a packaged file (``build_config`` and ``--config`` take paths)."""
    if isinstance(resource, Path):
        return resource
    return _extracted.enter_context(importlib.resources.as_file(resource))


def shipped_config(name: str) -> Path:
    """``demo.yaml``, ``debug.yaml``, ``kd.yaml``: a config file shipped in the package."""
    resource = CONFIGS / name
    if not resource.is_file():
        valid = ", ".join(sorted(p.name for p in CONFIGS.iterdir() if p.name.endswith(".yaml")))
        raise ConfigError(f"no shipped config {name!r}; shipped configs: {valid}")
    return _on_disk(resource)


def describe(text: str) -> str:
    """A YAML file's leading description: its first comment paragraph joined into one line. The paragraph
    is the ``# `` lines at the top of the file, up to an empty ``#`` line, an indented one (the
    ``#   kdcache ...`` usage lines) or the first line that is not a comment."""
    words = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if not body.strip() or body.startswith("  "):
            break
        words.append(body.strip())
    return " ".join(words)


def _recipe_files() -> list[Traversable]:
    folder = _recipes_dir()
    if not folder.is_dir():
        raise ConfigError(f"the recipes kdcache ships are missing ({folder} is not a folder): this install is incomplete; reinstall kdcache")
    return sorted((p for p in folder.iterdir() if p.name.endswith(".yaml")), key=lambda p: p.name)


def list_recipes() -> dict[str, str]:
    """Recipe name -> its description (what it does, the whole first comment paragraph)."""
    return {p.name.removesuffix(".yaml"): describe(p.read_text()) for p in _recipe_files()}


def recipe_path(name: str) -> Path:
    resource = _recipes_dir() / f"{name}.yaml"
    if not resource.is_file():
        valid = ", ".join(list_recipes()) or f"none in {_recipes_dir()}"
        raise ConfigError(f"unknown recipe {name!r}; valid recipes: {valid}")
    return _on_disk(resource)
