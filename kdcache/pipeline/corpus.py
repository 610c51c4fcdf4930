"""Real English prose that every machine has without a download: the Python standard library's docstrings.

Parsed with ``ast`` (nothing is imported or executed), in sorted file order, so the corpus is the same
on every machine with the same Python version.
"""

from __future__ import annotations

import ast
import inspect
import sysconfig
from pathlib import Path
from typing import Iterator

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DATASETS = ("stdlib-docs",)
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__", "ensurepip", "pydoc_data"}


def stdlib_docstrings(min_chars: int = 300, max_chars: int = 4000) -> Iterator[dict]:
    """Yield ``{"text", "source"}`` for each long-enough docstring, deduplicated, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node, clean=False)
            if not doc:
                continue
            text = inspect.cleandoc(doc).strip()
            if len(text) < min_chars or text in seen:
                continue
            seen.add(text)
            name = getattr(node, "name", "<module>")
            yield {"text": text[:max_chars], "source": f"{rel.as_posix()}:{name}"}
