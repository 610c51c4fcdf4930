"""Real English prose that every machine has without a download: the Python standard library's docstrings.

Parsed with ``ast`` (nothing is imported or executed), in sorted file order, so the corpus is the same
on every machine with the same Python version. Each row says where it comes from (``source``, and
``module``: the top-level module or package), a label that needs no annotator: ``stdlib-modules`` is the
docstrings of the MODULES largest modules, interleaved so any prefix of it is close to balanced, for
classifiers (which module does this docstring document?).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import sysconfig
from pathlib import Path
from typing import Iterator

EMBEDDED_PREFIX = "embedded:"
MODULES = 8  # classes of stdlib-modules
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
            yield {"text": text[:max_chars], "source": f"{rel.as_posix()}:{name}", "module": rel.parts[0].removesuffix(".py")}


def stdlib_modules(classes: int = MODULES) -> Iterator[dict]:
    """Docstrings of the ``classes`` modules with the most of them, round-robin over the modules (each module's
    rows in a fixed pseudo-random order), so the first N rows hold about N / classes of each."""
    by_module: dict[str, list[dict]] = {}
    for row in stdlib_docstrings():
        by_module.setdefault(row["module"], []).append(row)
    largest = sorted(by_module, key=lambda m: (-len(by_module[m]), m))[:classes]
    queues = [sorted(by_module[m], key=lambda r: hashlib.sha256(r["source"].encode()).hexdigest()) for m in sorted(largest)]
    for i in range(max(len(q) for q in queues)):
        for q in queues:
            if i < len(q):
                yield q[i]


from kdcache.pipeline.word_problems import word_problems, word_problems_test  # noqa: E402 (the registry below names it)

EMBEDDED_ROWS = {"stdlib-docs": stdlib_docstrings, "stdlib-modules": stdlib_modules, "word-problems": word_problems,
                 "word-problems-test": word_problems_test}
EMBEDDED_DATASETS = tuple(EMBEDDED_ROWS)
