"""Cheap, stable fingerprints: they let a cache prove which tokenizer, teacher and data made it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def json_hash(obj: Any, n: int = 16) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the vocabulary (token -> id) and the special tokens: what makes token ids comparable."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return json_hash({"vocab": vocab, "special": specials})


def file_fingerprint(path: str | Path, sample: int = 1 << 20) -> str:
    """Size plus the first and last MiB of a file: cheap for multi-GB weights, still catches swaps."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(sample))
        if size > 2 * sample:
            f.seek(size - sample)
            h.update(f.read(sample))
    return h.hexdigest()[:16]


def tree_fingerprint(path: str | Path, suffixes: tuple[str, ...] | None = None) -> str:
    """Fingerprint of a file, or of every (matching) file in a folder by relative name."""
    path = Path(path)
    if path.is_file():
        return file_fingerprint(path)
    parts = []
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            if suffixes and not name.endswith(suffixes):
                continue
            full = Path(root) / name
            parts.append((str(full.relative_to(path)), file_fingerprint(full)))
    return json_hash(parts)
