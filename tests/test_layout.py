"""The design card's rules, checked on the source: namespaced packages and dependency direction."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent / "kdcache"


def _imports(package: str) -> set[str]:
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
    return names


def test_every_source_folder_is_a_regular_package():
    """setuptools' find_packages skips folders without __init__.py: a wheel would silently lack them."""
    for folder in [ROOT, *(p for p in ROOT.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        if any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), f"{folder} has modules but no __init__.py"


def test_cache_knows_nothing_of_models_or_other_stages():
    imported = _imports("cache")
    assert not {m for m in imported if m.startswith(("transformers", "kdcache.pipeline", "kdcache.train", "kdcache.modeling"))}


def test_train_never_imports_teacher_backends_or_the_pipeline():
    imported = _imports("train")
    assert not {m for m in imported if m.startswith("kdcache.pipeline")}
