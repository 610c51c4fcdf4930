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

from kdcache import __version__
from kdcache.cache.filesystem import as_path, is_remote
from kdcache.errors import CacheFormatError, CacheMismatchError

FORMAT_VERSION = 2
"""The newest format this kdcache writes: 2 stores the top-k through a coded storage (kdcache/cache/topk_storage.py);
a cache whose top-k is plain lists is still written (and read) as format 1, byte for byte as before."""
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "_manifest.json"
TOKENIZER_DIR = "_tokenizer"
"""What is not data starts with ``_``, so pyarrow.dataset, pandas and DuckDB skip it by their own
convention and read the cache folder as a Parquet dataset."""
LEGACY_MANIFEST_NAME = "manifest.json"
LEGACY_TOKENIZER_DIR = "tokenizer"
"""The names of caches written before the rename; such a cache keeps them (see :func:`layout_of`)."""


@dataclass(frozen=True)
class Layout:
    """The names of a cache's manifest and tokenizer folder."""

    manifest: str
    tokenizer: str

    @property
    def legacy(self) -> bool:
        return self.manifest == LEGACY_MANIFEST_NAME


LAYOUT = Layout(MANIFEST_NAME, TOKENIZER_DIR)
LEGACY_LAYOUT = Layout(LEGACY_MANIFEST_NAME, LEGACY_TOKENIZER_DIR)


def layout_of(path: str | Path) -> Layout:
    """The layout of the cache at ``path``: the old names where only the old manifest is there (a cache
    written before the rename keeps its names when it is read, resumed or verified, so a directory never
    holds two manifests), else the current ones (also for a directory that is not a cache yet).
    ``--overwrite`` moves an old cache to the current names once its old content is gone."""
    path = as_path(path)
    if not (path / MANIFEST_NAME).exists() and (path / LEGACY_MANIFEST_NAME).is_file():
        return LEGACY_LAYOUT
    return LAYOUT


def manifest_path(path: str | Path) -> Path:
    """Where the manifest of the cache at ``path`` is (or will be written)."""
    return as_path(path) / layout_of(path).manifest


def check_one_manifest(path: Path) -> None:
    """kdcache never leaves both names in one folder; if both are there, one was copied in and which one
    describes the shards cannot be told, so nothing reads, resumes or overwrites the folder."""
    if (path / MANIFEST_NAME).exists() and (path / LEGACY_MANIFEST_NAME).exists():
        raise CacheFormatError(
            f"{path} holds two manifests ({MANIFEST_NAME} and the older {LEGACY_MANIFEST_NAME}); kdcache never writes both, "
            "so one was copied in: move the one that does not describe this folder's shards elsewhere"
        )


def tokenizer_path(path: str | Path) -> Path:
    """Where the tokenizer copy of the cache at ``path`` is (or will be written)."""
    return as_path(path) / layout_of(path).tokenizer

SHARD_RE = re.compile(r"part-(?:\d{5}|[1-9]\d{5,})\.parquet")
"""kdcache's shard names, exactly as the writer makes them: ``part-{index:05d}.parquet``. pyarrow's
``part-{i}.parquet`` (``part-0.parquet``) does not match; only names the manifest lists, or names of this
exact form in a directory holding a kdcache manifest, are ever treated as kdcache's."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


PART_DIR_RE = re.compile(r"part-(\d{5}|[1-9]\d{5,})-of-(\d{5}|[1-9]\d{5,})")
"""The folder of one part of a job array (``generate --num-shards N --shard-index I``), exactly as generate names
it: ``part-{I:05d}-of-{N:05d}``. A merged cache (kdcache/cache/merge.py) is the folder holding the parts."""


def part_dir_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def listed_name_ok(name: object) -> bool:
    """A shard name a manifest may list: a plain kdcache shard name in the cache directory, or, in a merged cache,
    one level down in a part folder (``part-00001-of-00003/part-00000.parquet``). Both patterns are fixed
    characters, so no name can hold ``..``, an absolute path or a second level."""
    if not isinstance(name, str):
        return False
    if SHARD_RE.fullmatch(name):
        return True
    folder, slash, shard = name.partition("/")
    return bool(slash) and PART_DIR_RE.fullmatch(folder) is not None and SHARD_RE.fullmatch(shard) is not None


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
    open_tokens: int = 0
    """Tokens of the row group that a time-bounded commit cut short at this shard's end (0: it ended where
    row groups end by size). The next shard's first row group continues it, and readers treat the two as
    one unit, so the units a reader shuffles are the same however often a run was committed or stopped."""


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
    kdcache_version: str = field(default_factory=lambda: __version__)
    """The kdcache release that last wrote this manifest (a resumed cache may hold shards of earlier ones).
    Not part of the settings, so an upgrade still resumes; manifests written before it load as ""."""

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
        if version not in READABLE_VERSIONS:
            raise CacheFormatError(
                f"{where} has cache format version {version!r}, this kdcache reads versions {', '.join(map(str, READABLE_VERSIONS))}; "
                "install the kdcache release that wrote it or regenerate the cache"
            )
        data.pop("settings_hash", None)
        data.setdefault("kdcache_version", "")  # written before the field existed
        try:
            shards = [ShardInfo(**s) for s in data.pop("shards", [])]
            manifest = cls(shards=shards, **data)
        except TypeError as exc:
            raise CacheFormatError(f"{where} is missing or has unexpected fields ({exc}); regenerate the cache") from None
        seen: set[str] = set()
        for s in shards:
            # Shards live in the cache directory itself (a merged cache: in its part folders, one level down): a name
            # is a kdcache shard file name, never a path of its own.
            if not listed_name_ok(s.name) or s.name in seen:
                raise CacheFormatError(
                    f"{where} lists shard {s.name!r}, which is not a kdcache shard file name in the cache directory "
                    "(part-NNNNN.parquet, or part-IIIII-of-NNNNN/part-NNNNN.parquet in a merged cache, listed once); "
                    "the manifest was not written by kdcache or was edited, regenerate the cache"
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
    path = as_path(path)
    mpath = manifest_path(path)
    if not path.exists():
        raise CacheFormatError(f"cache {path} does not exist; run `kdcache generate --out {path}` first")
    check_one_manifest(path)
    if not mpath.is_file():
        raise CacheFormatError(
            f"{path} is not a kdcache cache (no {MANIFEST_NAME}); point at a directory written by `kdcache generate`"
        )
    return Manifest.from_json(mpath.read_text(), where=str(mpath))


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename: readers see the old file or the new one, never a torn one. On an object store one PUT
    does the same (an object is replaced whole)."""
    if is_remote(path):
        path.write_bytes(data)
        return
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
    with path.open("rb") if is_remote(path) else open(path, "rb") as f:
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
    if is_remote(path):
        return  # a completed PUT is durable; prefixes are not objects
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
