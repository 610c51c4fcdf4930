"""Streaming cache writer: bounded memory, atomic shards, resumable.

Examples are buffered until a row group's worth of tokens, converted to Arrow in one vectorised step
and appended to a hidden temporary shard. A shard is committed by fsync + rename + manifest update, in
that order, so a crash at any moment leaves only committed shards visible; the next run with the same
settings resumes after the last committed input row.

One writer per cache: the writer holds ``CACHE/.kdcache.lock`` (kdcache.cache.lock) from before it reads
the old manifest until ``close()``/``abort()``, so clearing or resuming a cache never races another
writer. Only kdcache's own files are ever removed, and only in a directory that holds a kdcache manifest:
the shards it lists, unlisted ``part-NNNNN.parquet`` shards past them (renamed but not yet listed when a
run died), the tokenizer directory and kdcache's temporary files. Temporary names carry the pid and a
random token, so two processes never share one.

A shard is committed when it holds ``shard_tokens`` tokens or when its first row has waited
``commit_seconds`` (whichever comes first), so an interrupted run keeps all but the last
``commit_seconds`` of teacher work however slow the teacher is. The clock is read once per row
(``time.monotonic``, no syscall), and shards are only ever cut between input rows.

On an object store (kdcache/cache/filesystem.py) there is no rename: a shard is uploaded straight to its name and
appears only when its upload completes (an aborted one leaves nothing), then the manifest is replaced in one PUT.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.cache.codecs import get_codec
from kdcache.cache.filesystem import as_path, is_complete_tree, is_remote
from kdcache.cache.lock import LOCK_NAME, CacheLock
from kdcache import __version__
from kdcache.cache.manifest import (
    LAYOUT,
    LEGACY_MANIFEST_NAME,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    fsync_dir,
    read_manifest,
    shard_index,
    shard_name,
    check_one_manifest,
    layout_of,
    temp_suffix,
    tokenizer_path,
    write_atomic,
)
from kdcache.cache.schema import build_schema, column_codecs, format_version, scale_columns
from kdcache.cache.signals import read_layout
from kdcache.errors import CacheFormatError, CacheLockedError, CacheMismatchError, KDCacheError, OutOfSpaceError

log = logging.getLogger(__name__)

_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)}
_SPACE_TEXT = ("No space left", "File too large", "quota exceeded")


_TEMP_RE = re.compile(
    r"\.part-\d{5,}\.\d+-[0-9a-f]+\.parquet\.tmp"  # in-flight shard
    r"|\.part-\d{5,}\.parquet\.tmp"  # in-flight shard, kdcache <= 0.x naming
    r"|\._?manifest\.json\.\d+-[0-9a-f]+\.tmp|\.manifest\.json\.tmp-\d+"  # manifest being replaced (new, old naming)
    r"|\.write-probe-\d+-[0-9a-f]+|\.write-probe-\d+"  # writability probe
    r"|\._?tokenizer\.tmp(?:\.\d+-[0-9a-f]+)?"  # tokenizer being saved (_tokenizer, or an old cache's tokenizer)
    r"|\.\.kdcache\.lock\.\d+-[0-9a-f]+\.tmp"  # lock being taken over (write_atomic's name)
)
"""kdcache's temporary files: removed only in a directory that holds a kdcache manifest, under its lock."""


def is_temp_name(name: str) -> bool:
    return _TEMP_RE.fullmatch(name) is not None


def install_tokenizer(out: Path, write: Callable[[Path], None]) -> None:
    """``out/_tokenizer`` (``tokenizer`` in a cache of the old layout) written by ``write(folder)`` into a
    uniquely named temporary folder, then renamed: a crash never leaves half a tokenizer, and two processes
    never share a temporary name. Call it under the cache's writer lock, after the writer has opened the
    cache (it does nothing when the tokenizer is already there).

    On an object store (no rename) the folder is written locally, then every file missing or of another size
    there is uploaded: a copy an interrupted run left half made is completed by the rerun."""
    out = as_path(out)
    target = tokenizer_path(out)
    if is_remote(out):
        with tempfile.TemporaryDirectory(prefix="kdcache-tokenizer-") as tmp:
            local = Path(tmp) / target.name
            write(local)
            if not is_complete_tree(target, local):
                target.upload_tree(local)
        return
    if target.is_dir():
        return
    tmp = out / f".{target.name}.tmp.{temp_suffix()}"
    write(tmp)
    tmp.rename(target)


def is_space_error(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) in _SPACE_ERRNOS or any(t in str(exc) for t in _SPACE_TEXT)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


class CacheWriter:
    """Writes examples into ``path`` as zstd Parquet shards plus ``_manifest.json``.

    Use ``add_row(examples, input_rows_end)`` once per input row (possibly with no examples for a bad
    row), then ``close()``. ``resume_input_row`` says how many input rows are already committed.

    Sizes: a row group holds ``row_group_tokens`` (at most ``shard_tokens``) tokens, a shard
    ``shard_tokens``, both rounded up to whole input rows; ``commit_seconds`` (None: no time bound) cuts
    both early once the oldest uncommitted row has waited that long.
    """

    def __init__(
        self,
        path: str | Path,
        settings: dict,
        signals: dict,
        *,
        overwrite: bool = False,
        shard_tokens: int = 4_000_000,
        row_group_tokens: int = 16_384,
        commit_seconds: float | None = 60.0,
        compression_level: int = 1,
        created_by: str = "",
        command: str | None = None,
    ):
        """``command``: what the lock file says is writing (default: this process's command line)."""
        if shard_tokens < 1 or row_group_tokens < 1 or (commit_seconds is not None and not commit_seconds > 0):
            raise KDCacheError(
                f"shard_tokens ({shard_tokens}) and row_group_tokens ({row_group_tokens}) must be positive and "
                f"commit_seconds ({commit_seconds}) positive or None"
            )
        self.path = as_path(path)
        self.schema = build_schema(signals)
        self._codecs = {name: get_codec(c) for name, c in column_codecs(signals).items()}
        self._list_cols = [f.name for f in self.schema if pa.types.is_list(f.type)]
        self._scale_cols = scale_columns(signals)  # int8 column -> its per-token scale column (filled with it)
        self._widths = {name: int(col["shape"][-1]) for sig in signals.values() for name, col in sig.get("columns", {}).items()
                        if name in self._scale_cols}
        self._groups = read_layout(signals).groups  # stream groups (a coded top-k): columns encoded together
        self.shard_tokens = shard_tokens
        self.row_group_tokens = min(row_group_tokens, shard_tokens)  # a shard holds at least one row group
        self.commit_seconds = commit_seconds
        self._oldest: float | None = None
        """time.monotonic() when the first uncommitted example arrived (None: nothing uncommitted)."""
        self.layout = LAYOUT
        self.compression_level = compression_level
        self._created = not self.path.exists()
        self._closed = False
        # Buffer state first: a failed write during _open (e.g. a full disk on the first manifest) drops it.
        self._pending: list[Mapping[str, Any]] = []
        self._pending_tokens = 0
        self.rows_added = 0
        """Examples added by this writer (this run), committed or not."""
        self._shard: pq.ParquetWriter | None = None
        self._shard_tmp: Path | None = None
        self._sink: _HashingFile | None = None  # the shard's file, hashed as it is written
        self._shard_rows = 0
        self._shard_tokens = 0
        self._shard_row_groups: list[int] = []
        self._group_tokens = 0
        """Tokens already flushed of the row group in progress: nonzero only after a time-bounded commit cut
        it, so the rest of it (next shard) still ends where it would have without the cut."""
        self._check_writable()
        self._lock = CacheLock(self.path, command)
        try:
            self._lock.acquire()  # raises CacheLockedError at once if taken
            self.manifest = self._open(settings, signals, overwrite, created_by)
        except BaseException as exc:
            if self._created and self._lock.held:
                self._discard_own_files()  # a folder this writer created: nothing of it stays
            self._lock.release()
            if self._created and not isinstance(exc, CacheLockedError):
                try:
                    self.path.rmdir()
                except OSError:
                    pass  # not empty: something else lives there now
            raise
        if self.manifest.status == "complete":
            self._lock.release()  # nothing will be written
        self.stats: dict[str, Any] = dict(self.manifest.stats)
        self._input_rows_end = self.resume_input_row
        self._group_tokens = self.manifest.shards[-1].open_tokens if self.manifest.shards else 0

    # ------------------------------------------------------------------ setup
    def _open(self, settings: dict, signals: dict, overwrite: bool, created_by: str) -> Manifest:
        """Called with the lock held."""
        fresh = Manifest(format_version=format_version(signals), settings=settings, signals=signals, created_by=created_by)
        check_one_manifest(self.path)
        self.layout = layout_of(self.path)  # an old cache keeps its names when resumed
        if (self.path / self.layout.manifest).exists():
            try:
                old = read_manifest(self.path)
            except CacheFormatError:
                if not overwrite:
                    raise
                old = None
            if old is not None and old.settings_hash == fresh.settings_hash and old.signals == signals and not overwrite:
                self._remove_strays(old)
                old.kdcache_version = __version__  # the release writing it from now on
                if old.shards:
                    log.info("resuming cache %s: %d shards, %d rows committed", self.path, len(old.shards), old.num_rows)
                return old
            if old is not None and not overwrite:
                changed = _diff_keys(old.settings, settings) + _diff_keys(old.signals, signals)
                raise CacheMismatchError(
                    f"{self.path} already holds a cache made with different settings "
                    f"({', '.join(changed[:4]) or 'settings'} differ); use another --out or pass --overwrite to replace it"
                )
            # The fresh (empty, in-progress) manifest replaces the old one before any old shard is removed: a
            # crash in between leaves old shards unlisted (strays the next run removes), never a listed one missing.
            self._write_manifest(fresh)
            self._clear(old)
            self._upgrade_layout()
            return fresh
        else:
            # No manifest: not a kdcache cache (a crashed run always leaves one: it is written first), so
            # nothing here is removed. Only kdcache temporary files (a run that died while writing its first
            # manifest) may be present; they stay until a later run finds the manifest.
            foreign = sorted(p.name for p in self.path.iterdir() if p.name != LOCK_NAME and not is_temp_name(p.name))
            if foreign:
                raise CacheMismatchError(
                    f"{self.path} is not empty and is not a kdcache cache (no {MANIFEST_NAME}; holds {foreign[0]!r}"
                    f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); choose an empty --out "
                    "(--overwrite only replaces kdcache caches, never other files)"
                )
        self._write_manifest(fresh)
        return fresh

    def _upgrade_layout(self) -> None:
        """``--overwrite`` of a cache with the old names, once its old content is gone: one rename moves the
        (fresh, empty) manifest to the current name, so foreign Parquet readers can read the new cache and
        the folder holds one manifest at every moment. A crash before it leaves an empty old-layout cache."""
        if self.layout == LAYOUT:
            return
        if is_remote(self.path):
            raise KDCacheError(f"{self.path} holds a cache of the old layout ({LEGACY_MANIFEST_NAME}), which an object store "
                               "cannot rename in place; remove its objects (or choose another --out) and rerun")
        try:
            os.replace(self.path / LEGACY_MANIFEST_NAME, self.path / MANIFEST_NAME)
            fsync_dir(self.path)
        except OSError as exc:
            self._fail(exc)
        self.layout = LAYOUT

    def _check_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-probe-{temp_suffix()}"
            probe.write_bytes(b"")
            probe.unlink(missing_ok=True)  # it has a temporary name: another writer's cleanup may have removed it
        except OSError as exc:
            if is_space_error(exc):
                raise OutOfSpaceError(f"no space left to create {self.path}; free disk space or choose another --out") from None
            raise KDCacheError(
                f"output directory {self.path} is not writable ({exc.strerror or exc}); choose another --out"
            ) from None

    @staticmethod
    def _remove(p: Path) -> None:
        if is_remote(p):
            p.remove_tree()  # an object, or a prefix (the tokenizer) and the objects under it
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

    def _clear(self, old: Manifest | None) -> None:
        """``--overwrite``, after the fresh manifest is written: remove the old cache's shards (those its old
        manifest listed), its tokenizer and kdcache's temporary files, nothing else. A damaged manifest lists
        nothing, so its shards stay until a later run removes them as strays."""
        listed = {s.name for s in old.shards} if old is not None else set()
        try:
            for p in self.path.iterdir():
                if p.name in listed or p.name == self.layout.tokenizer or is_temp_name(p.name):
                    self._remove(p)
        except OSError as exc:
            self._fail(exc)

    def _remove_strays(self, old: Manifest) -> None:
        """Resume: drop work that was in flight. kdcache's temporary files, and shards with kdcache's exact
        name ``part-NNNNN.parquet`` past the listed ones (renamed, but the manifest update never happened).
        Anything else (e.g. pyarrow's ``part-0.parquet``) is not ours and stays."""
        listed = {s.name for s in old.shards}
        for p in self.path.iterdir():
            if p.name in listed:
                continue
            index = shard_index(p.name)
            if is_temp_name(p.name) or (index is not None and index >= len(old.shards)):
                self._remove(p)

    # ------------------------------------------------------------------ api
    @property
    def complete(self) -> bool:
        return self.manifest.status == "complete"

    @property
    def resume_input_row(self) -> int:
        return self.manifest.shards[-1].input_rows_end if self.manifest.shards else 0

    def count(self, key: str, n: int = 1) -> None:
        """Count something for the manifest's ``stats`` (e.g. bad rows by reason)."""
        self.stats[key] = self.stats.get(key, 0) + n

    def add_row(self, examples: Sequence[Mapping[str, Any]], input_rows_end: int) -> None:
        """Add every example made from one input row; ``input_rows_end`` is that row's index + 1.

        Shards are only cut between input rows, so a resume never duplicates part of a row's examples.
        """
        if self.complete:
            raise KDCacheError(f"{self.path} is already complete; pass --overwrite to regenerate it")
        if self._closed:
            raise KDCacheError(f"the writer of {self.path} was aborted; rerun the same command to resume the cache")
        self.rows_added += len(examples)
        for ex in examples:
            self._pending.append(ex)
            self._pending_tokens += len(ex["input_ids"])
        self._input_rows_end = input_rows_end
        if self.commit_seconds is not None and (self._pending or self._shard is not None):
            now = time.monotonic()
            if self._oldest is None:
                self._oldest = now
            elif now - self._oldest >= self.commit_seconds:
                # a row group short of its size is cut here; the next shard's first row group continues it
                self._flush_row_group(ends_group=self._group_tokens + self._pending_tokens >= self.row_group_tokens)
                self._commit_shard()
                return
        if self._group_tokens + self._pending_tokens >= self.row_group_tokens:
            self._flush_row_group()
        if self._shard_tokens >= self.shard_tokens:
            self._commit_shard()

    def close(self) -> Manifest:
        """Commit what is buffered, mark the cache complete and release its lock."""
        if self._closed and not self.complete:
            if not self._discardable():
                self._lock.release()
            raise KDCacheError(f"the writer of {self.path} was aborted; rerun the same command to resume the cache")
        try:
            if not self.complete:
                self._flush_row_group()
                self._commit_shard(force=True)
                if self.manifest.shards:
                    self.manifest.shards[-1].open_tokens = 0  # the cache ends here, and with it its last row group
                self.manifest.status = "complete"
                self.manifest.stats = dict(self.stats)
                try:
                    self._write_manifest(self.manifest)
                except BaseException:
                    self.manifest.status = "in_progress"  # not on disk: the cache is not complete
                    raise
        except BaseException:
            self._drop_in_flight()
            self._closed = True
            if not self._discardable():
                self._lock.release()
            # else kept for the caller's abort(discard_new=True), which removes the new folder under this same
            # lock (a lock given back here could be lost to another process first); __exit__ calls abort, and
            # the lock object releases it when garbage collected.
            raise
        self._closed = True
        self._lock.release()
        return self.manifest

    def abort(self, discard_new: bool = False) -> None:
        """Drop the in-flight shard and release the lock; committed shards stay and a rerun resumes after them.

        ``discard_new``: if this writer created the directory and nothing was committed, remove what it
        wrote (manifest, tokenizer, temporary files) and the directory if that leaves it empty.
        """
        self._drop_in_flight()
        self._closed = True
        if not (discard_new and self._discardable() and self._lock.held):
            self._lock.release()  # (not held: already released by close() or an earlier abort(); nothing to clean)
            return
        try:
            self._discard_own_files()
        finally:
            self._lock.release()
        try:
            self.path.rmdir()
        except OSError:
            pass  # something else lives there now: leave it

    def _discardable(self) -> bool:
        """This writer created the directory and nothing is committed (nor is the cache complete)."""
        manifest = getattr(self, "manifest", None)
        return self._created and manifest is not None and not manifest.shards and manifest.status != "complete"

    def _discard_own_files(self) -> None:
        """With the lock held, in a directory this writer created: remove what kdcache wrote there."""
        try:
            for p in self.path.iterdir():
                if p.name in (self.layout.manifest, self.layout.tokenizer) or is_temp_name(p.name):
                    self._remove(p)
        except OSError:
            pass  # best effort: the error that brought us here is the one to report

    def _drop_in_flight(self) -> None:
        self._pending.clear()
        self._pending_tokens = 0
        self._oldest = None
        if self._shard is not None:
            try:
                self._shard.close()
            except Exception:  # noqa: BLE001 - the shard is discarded anyway
                pass
            self._shard = None
        if self._sink is not None:
            try:
                self._sink.discard()
            except OSError:
                pass  # (a full disk fails the flush too) the shard is discarded anyway
            self._sink = None
        if self._shard_tmp is not None:
            try:
                self._shard_tmp.unlink(missing_ok=True)
            except OSError:
                pass  # a temporary name: the next run removes it
        self._shard_tmp = None
        self._shard_rows = self._shard_tokens = 0
        self._shard_row_groups = []

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()  # gives back a lock close() kept (a new, empty directory)
                raise
        else:
            self.abort()

    # ------------------------------------------------------------------ internals
    def to_record_batch(self, examples: Sequence[Mapping[str, Any]]) -> pa.RecordBatch:
        """Vectorised conversion: one concatenation per column, offsets from lengths."""
        arrays = []
        scales: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # scale column -> (offsets, values), made with its column
        streams = {name: array for g in self._groups for name, array in g.encode(examples).items()}  # all at once
        for field in self.schema:
            name = field.name
            if name in streams:
                arrays.append(streams[name])
            elif name in scales:
                offsets, flat = scales.pop(name)
                arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=field.type.value_type)))
            elif name in self._scale_cols:  # int8: one binary blob per example, its per-token scales alongside
                parts = [np.asarray(ex[name], dtype=np.float32).reshape(-1) for ex in examples]
                offsets = np.zeros(len(parts) + 1, dtype=np.int32)
                np.cumsum([p.size for p in parts], out=offsets[1:])
                width = self._widths[name]
                flat = np.concatenate(parts) if parts else np.zeros(0, np.float32)
                q, scale = self._codecs[name].encode_rows(flat.reshape(-1, width))
                scales[self._scale_cols[name]] = (offsets // width, scale)
                arrays.append(pa.Array.from_buffers(pa.binary(), len(parts), [None, pa.py_buffer(offsets), pa.py_buffer(q.tobytes())]))
            elif name in self._list_cols:
                parts = [np.asarray(ex[name]).reshape(-1) for ex in examples]
                lengths = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
                offsets = np.zeros(len(parts) + 1, dtype=np.int32)
                np.cumsum(lengths, out=offsets[1:])
                flat = np.concatenate(parts) if parts else np.zeros(0)
                codec = self._codecs.get(name)
                if codec is not None:
                    flat = codec.encode(flat)
                else:
                    flat = flat.astype(field.type.value_type.to_pandas_dtype(), copy=False)
                values = pa.array(flat, type=field.type.value_type)
                arrays.append(pa.ListArray.from_arrays(pa.array(offsets), values))
            else:
                arrays.append(pa.array([ex[name] for ex in examples], type=field.type))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def _flush_row_group(self, ends_group: bool = True) -> None:
        """Write the pending examples as one Parquet row group. ``ends_group``: the row group ends where
        the size rule ends it (or at the end of the cache); False only for a time-bounded cut, whose tokens
        then count toward the row group the next shard continues."""
        self._group_tokens = 0 if ends_group else self._group_tokens + self._pending_tokens
        if not self._pending:
            return
        batch = self.to_record_batch(self._pending)
        try:
            if self._shard is None:
                index = len(self.manifest.shards)
                # no rename on an object store: the shard goes to its name, and appears only once its upload completes
                self._shard_tmp = self.path / (shard_name(index) if is_remote(self.path) else
                                               f".{shard_name(index)[:-8]}.{temp_suffix()}.parquet.tmp")
                self._sink = _HashingFile(self._shard_tmp)
                self._shard = pq.ParquetWriter(
                    self._sink,
                    self.schema,
                    compression="zstd",
                    compression_level=self.compression_level,
                    use_dictionary=["example_id"],
                    write_statistics=["example_id", "teacher_nll", "teacher_entropy", "num_loss_tokens"],
                    data_page_size=256 * 1024,
                    data_page_version="2.0",  # levels stay uncompressed: ~15% faster writes, same size
                    write_page_checksum=True,  # CRC32 per page; the reader verifies every page it decodes
                )
            self._shard.write_batch(batch, row_group_size=len(self._pending))
        except OSError as exc:
            self._fail(exc)
        self._shard_rows += len(self._pending)
        self._shard_tokens += self._pending_tokens
        self._shard_row_groups.append(len(self._pending))
        self._pending = []
        self._pending_tokens = 0

    def _commit_shard(self, force: bool = False) -> None:
        if self._shard is None:
            if force and self._input_rows_end != self.resume_input_row:
                # Only bad rows since the last shard: record progress without an empty file.
                self.manifest.stats = dict(self.stats)
                if self.manifest.shards:
                    self.manifest.shards[-1].input_rows_end = self._input_rows_end
            return
        assert self._shard_tmp is not None
        index = len(self.manifest.shards)
        final = self.path / shard_name(index)
        try:
            self._shard.close()
            self._shard = None
            digest, size = self._sink.finish()  # flushed, fsynced; its sha256 computed as the bytes went out
            self._sink = None
            if not is_remote(self.path):
                os.replace(self._shard_tmp, final)
                fsync_dir(self.path)
        except OSError as exc:
            self._fail(exc)
        self.manifest.shards.append(
            ShardInfo(
                name=final.name,
                rows=self._shard_rows,
                tokens=self._shard_tokens,
                bytes=size,
                sha256=digest,
                row_groups=self._shard_row_groups,
                input_rows_end=self._input_rows_end,
                open_tokens=self._group_tokens,
            )
        )
        self.manifest.stats = dict(self.stats)
        try:
            write_atomic(self.path / self.layout.manifest, self.manifest.to_json().encode())
        except OSError as exc:
            # The shard is not committed until the manifest lists it: take it back out.
            self.manifest.shards.pop()
            final.unlink(missing_ok=True)
            self._fail(exc)
        self._shard_tmp = None
        self._shard_rows = self._shard_tokens = 0
        self._shard_row_groups = []
        self._oldest = None

    def _write_manifest(self, manifest: Manifest) -> None:
        try:
            write_atomic(self.path / self.layout.manifest, manifest.to_json().encode())
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        """Drop the in-flight work and raise one line. The lock stays held: close(), abort() or the except
        in __init__ give it back (and may first clean up under it)."""
        self._drop_in_flight()
        self._closed = True
        manifest = getattr(self, "manifest", None)  # unset while __init__ writes the first manifest
        committed = len(manifest.shards) if manifest is not None else 0
        if is_space_error(exc):
            resume = f" (it resumes after the {committed} committed shards)" if committed else ""
            raise OutOfSpaceError(f"no space left while writing {self.path}; free disk space and rerun the same command{resume}") from None
        if is_remote(self.path):  # most often the network or the store went away: the committed shards are kept
            resume = f" (it resumes after the {committed} committed shards)" if committed else ""
            raise KDCacheError(f"cannot write {self.path}: {' '.join(str(exc).split())}; check the network, endpoint and "
                               f"credentials, then rerun the same command{resume}") from None
        raise KDCacheError(f"cannot write {self.path}: {' '.join(str(exc).split())}") from None


class _HashingFile(io.RawIOBase):
    """The shard file as pyarrow's sink: sha256 and size follow the bytes as Parquet writes them (it only appends),
    so committing a shard does not read it back."""

    def __init__(self, path: Path):
        super().__init__()
        self._remote = is_remote(path)
        self._file = path.open("wb") if self._remote else open(path, "xb")
        self._hash = hashlib.sha256()
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = self._file.write(data)
        self._hash.update(memoryview(data)[:n])
        self._size += n
        return n

    def tell(self) -> int:
        return self._size

    def finish(self) -> tuple[str, int]:
        """Flush and fsync the file, close it; (sha256 hex, bytes)."""
        if self._remote:
            self._file.close()  # completes the upload: the object appears now, whole
        else:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        return self._hash.hexdigest(), self._size

    def discard(self) -> None:
        """Close without committing: on an object store the upload is aborted, so no object appears."""
        if self._remote and not self._file.closed:
            self._file.discard()
            self._file.closed = True  # fsspec would otherwise commit what it buffered at close
        self.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        super().close()
