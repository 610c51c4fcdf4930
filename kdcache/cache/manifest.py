"""The manifest: the JSON file that makes a directory a kdcache cache.

It is written last and atomically, so it is the commit marker: a shard exists for readers only once
the manifest lists it. ``settings`` holds everything that determines the cache's content; its hash
decides whether re-running a command resumes this cache or would mix two different caches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.errors import CacheFormatError, CacheMismatchError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"

SHARD_RE = re.compile(r"part-(?:\d{5}|[1-9]\d{5,})\.parquet")
"""kdcache's shard names, exactly as the writer makes them: ``part-{index:05d}.parquet``. pyarrow's
``part-{i}.parquet`` (``part-0.parquet``) does not match; only names the manifest lists, or names of this
exact form in a directory holding a kdcache manifest, are ever treated as kdcache's."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_index(name: str) -> int | None:
    """The index of a kdcache shard name, None for any other name."""
    return int(name[5:-8]) if SHARD_RE.fullmatch(name) else None


def temp_suffix() -> str:
    """``<pid>-<random hex>``: temporary names no other process (or writer) can share."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


@dataclass
class ShardInfo:
    """One committed Parquet file."""

    name: str
    rows: int
    tokens: int
    bytes: int
    sha256: str
    row_groups: list[int]
    """Rows in each row group, so readers can plan without opening footers."""
    input_rows_end: int
    """Input rows consumed (good and bad) once this shard is committed: where a resume starts."""


@dataclass
class Manifest:
    format_version: int
    settings: dict[str, Any]
    """What determines the content: teacher, tokenizer, dataset, generation. Hashed for resume."""
    signals: dict[str, Any]
    """Stored signals: per column its shape, dtype and codec."""
    shards: list[ShardInfo] = field(default_factory=list)
    status: str = "in_progress"
    stats: dict[str, Any] = field(default_factory=dict)
    """Counts for humans: bad rows by reason, totals."""
    created_by: str = ""

    @property
    def settings_hash(self) -> str:
        return settings_hash(self.settings)

    @property
    def teacher(self) -> dict:
        return self.settings.get("teacher", {})

    @property
    def tokenizer(self) -> dict:
        return self.settings.get("tokenizer", {})

    @property
    def top_k(self) -> int:
        return int(self.signals["topk"]["k"]) if "topk" in self.signals else 0

    @property
    def tail_temperatures(self) -> list[float]:
        """Temperatures the cache stores the teacher's exact tempered tail mass for (empty: none)."""
        return list((self.signals.get("topk") or {}).get("tail_temperatures") or [])

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["settings_hash"] = self.settings_hash
        return json.dumps(data, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CacheFormatError(f"{where} is not valid JSON ({exc.msg}); the cache is damaged, regenerate it") from None
        if not isinstance(data, dict):
            raise CacheFormatError(f"{where} is not a kdcache manifest (not a JSON object); the cache is damaged, regenerate it")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheFormatError(
                f"{where} has cache format version {version!r}, this kdcache reads version {FORMAT_VERSION}; "
                "install the kdcache release that wrote it or regenerate the cache"
            )
        data.pop("settings_hash", None)
        try:
            shards = [ShardInfo(**s) for s in data.pop("shards", [])]
            manifest = cls(shards=shards, **data)
        except TypeError as exc:
            raise CacheFormatError(f"{where} is missing or has unexpected fields ({exc}); regenerate the cache") from None
        seen: set[str] = set()
        for s in shards:
            # Shards live in the cache directory itself: a name is a plain kdcache shard file name, never a path.
            if not isinstance(s.name, str) or not SHARD_RE.fullmatch(s.name) or s.name in seen:
                raise CacheFormatError(
                    f"{where} lists shard {s.name!r}, which is not a kdcache shard file name in the cache directory "
                    "(part-NNNNN.parquet, listed once); the manifest was not written by kdcache or was edited, regenerate the cache"
                )
            seen.add(s.name)
        return manifest


def settings_hash(settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def require_same_tokenizer(a: Manifest, b: Manifest, a_name: str, b_name: str, purpose: str) -> None:
    """Token ids only mean the same thing under one tokenizer: caches mixed in one run must share it."""
    if a.tokenizer.get("fingerprint") != b.tokenizer.get("fingerprint") or a.vocab_size != b.vocab_size:
        raise CacheMismatchError(
            f"caches {a_name} and {b_name} use different tokenizers (fingerprints {a.tokenizer.get('fingerprint')} vs "
            f"{b.tokenizer.get('fingerprint')}, vocab {a.vocab_size} vs {b.vocab_size}); {purpose} needs one tokenizer"
        )


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    mpath = path / MANIFEST_NAME
    if not path.exists():
        raise CacheFormatError(f"cache {path} does not exist; run `kdcache generate --out {path}` first")
    if not mpath.is_file():
        raise CacheFormatError(
            f"{path} is not a kdcache cache (no {MANIFEST_NAME}); point at a directory written by `kdcache generate`"
        )
    return Manifest.from_json(mpath.read_text(), where=str(mpath))


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename: readers see the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{temp_suffix()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 4 MiB chunks (memory stays flat however large the shard)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a file that another call wrote (save_pretrained, save_file) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
