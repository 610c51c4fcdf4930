"""Recipes by name: the YAML files in ``configs/recipes/`` of a kdcache checkout (``--recipe NAME``)."""

from __future__ import annotations

from pathlib import Path

from kdcache.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "recipes"


def list_recipes() -> dict[str, str]:
    """Recipe name -> its first comment line (what it does)."""
    out = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        out[path.stem] = first
    return out


def recipe_path(name: str) -> Path:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        valid = ", ".join(list_recipes()) or f"none found in {RECIPES_DIR}"
        raise ConfigError(f"unknown recipe {name!r}; valid recipes: {valid}")
    return path
