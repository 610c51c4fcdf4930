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


def test_pipeline_never_imports_train_or_the_cli():
    """pipeline -> cache; the CLI and the demo live above both stages in kdcache.cli."""
    imported = _imports("pipeline")
    assert not {m for m in imported if m.startswith(("kdcache.train", "kdcache.cli"))}


def test_train_never_imports_the_cli():
    assert not {m for m in _imports("train") if m.startswith("kdcache.cli")}


def _module_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdcache"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("kdcache"))
    return names


def test_no_import_cycles_between_modules():
    """Every kdcache module's imports (top-level or deferred) form a DAG: a cycle means two modules are one."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        mod = ".".join(("kdcache", *path.relative_to(ROOT).with_suffix("").parts))
        mod = mod.removesuffix(".__init__")
        graph[mod] = {m for m in _module_imports(path) if m != mod}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [node, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for mod in graph:
        if mod not in state:
            visit(mod, [mod])
