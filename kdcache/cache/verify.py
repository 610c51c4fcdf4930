"""``kdcache verify``: check a cache's bytes and structure against its manifest, without training on it.

Every listed shard must exist with the recorded size and sha256 (the check that covers every byte),
open as Parquet with a footer that matches the manifest (schema = the manifest's signals, rows per row
group, rows and tokens per shard). ``deep=True`` also decodes every row group, all columns, with page
CRCs verified, and checks each row: list lengths consistent with T, k, H, the stored hidden positions
(``hidden_positions``: inside [0, T), ascending) and the sampled sizes, the
loss mask and ``num_loss_tokens``, token ids inside the vocabulary, and the shard's token total.

A damaged shard cannot be regenerated on its own (a resume only appends after the last committed
shard), so the fix named for every problem is to regenerate the cache.
"""

from __future__ import annotations

import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from kdcache.cache.filesystem import as_path
from kdcache.cache.manifest import Manifest, ShardInfo, file_sha256, read_manifest
from kdcache.cache.reader import (
    READ_ERRORS,
    DamagedShard,
    binary_offsets,
    check_footer,
    footer_value_counts,
    locate_damage,
    one_line,
    open_parquet,
    regenerate_fix,
    check_value_count,
)
from kdcache.cache.schema import build_schema
from kdcache.cache.signals import Rows, ordered
from kdcache.cache.signals.base import RowProblem
from kdcache.errors import CacheFormatError
from kdcache.config import plural


@dataclass
class ShardReport:
    name: str
    problems: list[str] = field(default_factory=list)
    row_groups_decoded: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport:
    path: str
    deep: bool
    status: str
    rows: int
    tokens: int
    bytes: int
    shards: list[ShardReport]
    fix: str

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.shards)

    @property
    def bad_shards(self) -> list[ShardReport]:
        return [s for s in self.shards if not s.ok]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        for s, r in zip(d["shards"], self.shards):
            s["ok"] = r.ok
        if self.ok:
            d["fix"] = None
        return d

    def lines(self) -> list[str]:
        """One line per bad shard, each naming the shard, what is wrong and the fix."""
        return [f"{self.path}: shard {s.name} is damaged ({'; '.join(s.problems)}); {self.fix}" for s in self.bad_shards]

    def summary(self) -> str:
        checked = "size, sha256, footer"
        if self.deep:
            decoded = sum(s.row_groups_decoded for s in self.shards)
            checked += f", {decoded} row groups decoded with page checksums and per-row invariants"
        state = "" if self.status == "complete" else f" (status {self.status}: generation has not finished)"
        return (
            f"cache {self.path}: {'ok' if self.ok else f'{len(self.bad_shards)} damaged'}, {plural(len(self.shards), 'shard')}, {plural(self.rows, 'row')}, {plural(self.tokens, 'token')}, "
            f"{self.bytes:,} bytes; checked {checked}{state}"
        )


def verify_cache(path: str | Path, deep: bool = False) -> VerifyReport:
    """Check every shard of the cache at ``path``; a manifest that cannot be read raises CacheFormatError."""
    path = as_path(path)
    manifest = read_manifest(path)
    try:
        schema = build_schema(manifest.signals)
    except CacheFormatError as exc:  # an unknown signal: say which cache holds it
        raise CacheFormatError(f"cache {path}: {exc}") from None
    reports = [_verify_shard(path, manifest, shard, schema, deep) for shard in manifest.shards]
    return VerifyReport(
        path=str(path), deep=deep, status=manifest.status, rows=manifest.num_rows, tokens=manifest.num_tokens,
        bytes=manifest.num_bytes, shards=reports, fix=regenerate_fix(manifest),
    )


def _os_error(exc: OSError) -> str:
    return exc.strerror or one_line(exc)


def _verify_shard(root: Path, manifest: Manifest, shard: ShardInfo, schema: pa.Schema, deep: bool) -> ShardReport:
    report = ShardReport(shard.name)
    problems = report.problems
    file = root / shard.name
    # A damaged disk (EIO), a permission problem or a directory in the shard's place is a problem of this
    # shard, reported like the others, never a traceback.
    try:
        st = file.stat()
    except (FileNotFoundError, NotADirectoryError):
        problems.append("listed in the manifest but missing")
        return report
    except OSError as exc:
        problems.append(f"cannot be read: {_os_error(exc)}")
        return report
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a special file"
        problems.append(f"not a regular file ({kind} has its name)")
        return report
    size = st.st_size
    if size != shard.bytes:
        problems.append(f"{size:,} bytes on disk, the manifest records {shard.bytes:,}: truncated or overwritten")
        return report
    try:
        digest = file_sha256(file)
    except OSError as exc:
        problems.append(f"cannot be read: {_os_error(exc)}")
        return report
    if digest != shard.sha256:
        sha = f"sha256 {digest[:12]}... differs from the manifest's {shard.sha256[:12]}..."
        if deep:
            problems.append(sha)  # the deep pass below names the row groups that fail
        else:
            group, detail = locate_damage(file, shard, schema)
            problems.append(f"{sha}; {'' if group is None else f'row group {group}: '}{one_line(detail)}")
            return report
    try:
        f = open_parquet(file)
        check_footer(f, shard, schema)
        tokens = sum(footer_value_counts(f, g, ["input_ids"])["input_ids"] for g in range(f.metadata.num_row_groups))
    except DamagedShard as exc:
        problems.append(str(exc))
        return report
    except READ_ERRORS as exc:
        problems.append(f"not readable Parquet: {one_line(exc)}")
        return report
    if tokens != shard.tokens:  # input_ids lists are never empty, so their Parquet values are the tokens
        problems.append(f"footer records {tokens:,} tokens, the manifest {shard.tokens:,}")
    if not deep:
        return report
    decoded_tokens = 0
    for g in range(f.metadata.num_row_groups):
        try:
            table = f.read_row_group(g)
            decoded_tokens += _check_rows(table, manifest, footer_value_counts(f, g, table.column_names))
        except DamagedShard as exc:
            problems.append(f"row group {g}: {exc}")
            continue
        except READ_ERRORS as exc:
            problems.append(f"row group {g}: Parquet read failed: {one_line(exc)}")
            continue
        report.row_groups_decoded += 1
    if report.row_groups_decoded == f.metadata.num_row_groups and decoded_tokens != shard.tokens:
        problems.append(f"rows hold {decoded_tokens:,} tokens, the manifest records {shard.tokens:,}")
    return report


def _column_shapes(manifest: Manifest) -> dict[str, list]:
    shapes: dict[str, list] = {"input_ids": ["T"], "loss_mask": ["T-1"]}
    for sig in manifest.signals.values():
        for name, col in sig.get("columns", {}).items():
            shapes[name] = list(col["shape"])
    return shapes


def _check_rows(table: pa.Table, manifest: Manifest, footer_values: dict[str, int]) -> int:
    """Per-row invariants of one decoded row group; returns its tokens. Raises DamagedShard naming the row."""
    n = table.num_rows
    lengths: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    offsets_of: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if col.null_count:
            raise DamagedShard(f"column {name} has {col.null_count} nulls")
        if pa.types.is_list(col.type):
            offsets = col.offsets.to_numpy().astype(np.int64)
            check_value_count(name, col, footer_values, offsets)
            if col.values.null_count:
                raise DamagedShard(f"column {name} has null values")
            offsets_of[name] = offsets
            lengths[name] = np.diff(offsets)
            values[name] = col.values.to_numpy(zero_copy_only=False)
        elif pa.types.is_binary(col.type):  # an int8 blob per row: its length in bytes is its number of values
            check_value_count(name, col, footer_values)
            offsets = binary_offsets(col)
            offsets_of[name] = offsets
            lengths[name] = np.diff(offsets)
        else:
            check_value_count(name, col, footer_values)
            values[name] = col.to_numpy(zero_copy_only=False)

    rows = Rows(table, lengths, values, offsets_of)
    T = rows.T
    try:
        rows.bad_row(T < 1, "no input_ids")
        signals = ordered(manifest.signals)
        rows.dims = {"T": T, "T-1": T - 1}
        for signal, entry in signals:
            rows.dims.update(signal.dims(entry, rows))
        for name, shape in _column_shapes(manifest).items():
            if name not in lengths:
                continue
            want = np.ones(n, dtype=np.int64)
            for d in shape:
                want = want * (rows.dims[d] if isinstance(d, str) else int(d))
            rows.bad_row(lengths[name] != want, lambda i: f"{name} holds {lengths[name][i]} values, T={T[i]} needs {want[i]}")
        for signal, entry in signals:
            signal.check_rows(entry, rows)
        rows.check_vocab("input_ids", manifest.tokenizer.get("vocab_size"))
    except RowProblem as exc:  # a row breaking its signal's invariants (codes that do not decode included)
        raise DamagedShard(str(exc)) from None
    return int(T.sum())
