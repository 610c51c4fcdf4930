"""Streaming cache reader: row group at a time, constant memory, seeded shuffle, resumable.

Shuffling is two-level and fully determined by ``(seed, epoch)``: the row groups are permuted, then
taken ``window`` at a time and the rows inside a window permuted. Memory is bounded by the window, not
the cache, and a position is just ``(epoch, window, offset)``: restoring it re-reads one window and
re-derives the same permutation, so a resumed run sees exactly the examples it would have seen.

Hidden states and q/k/v come back as float32 [rows, width] whatever their codec: int8 columns are
dequantised with their ``<column>_scale`` column (read along when a column subset is asked for, not
returned), and a hidden column asked for alone brings ``hidden_positions`` (which positions it holds).

Integrity: damaged bytes raise a one-line :class:`CacheFormatError` (naming the cache, shard, row group
and the fix) instead of returning changed values. Opening a cache checks that every listed shard exists
with the size the manifest records. The first open of a shard compares its sha256 with the manifest
(unless ``verify_sha256=False``): the only check that covers every byte, since Parquet page CRCs do not
cover page headers or the footer. Every opened footer must match the manifest (schema, rows per row
group), every page's CRC32 is verified as it is decoded, and every decoded column must hold as many
values as the footer records. ``kdcache verify`` runs the same checks over a whole cache.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.cache.codecs import get_codec
from kdcache.cache.filesystem import as_path, is_network_error, is_remote, local_copy
from kdcache.cache.manifest import Manifest, file_sha256, manifest_path, read_manifest, tokenizer_path
from kdcache.cache.schema import build_schema, column_codecs, scale_columns
from kdcache.cache.signals import ReadLayout, read_layout
from kdcache.errors import CacheFormatError, KDCacheError

Example = dict[str, Any]

READ_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)
"""What pyarrow raises on damaged Parquet (ArrowInvalid, ArrowIOError/OSError, UnicodeDecodeError, ...)."""

class RowGroupBlock:
    """One decoded row group: for list columns flat values + offsets, for scalars an array.

    Columns of a scaled codec (int8) are dequantised with their ``<name>_scale`` column over the whole row
    group at once; the scale column itself is consumed (examples hold the float32 values only). A stream group's
    columns (a coded top-k) are decoded together into its logical columns, or kept as codes (``topk_codes``)."""

    def __init__(self, table: pa.Table, manifest: Manifest, codecs: dict, footer_values: dict[str, int] | None = None,
                 topk_order: str = "rank", keep_float16: bool = False, topk_codes: bool = False, layout: ReadLayout | None = None):
        self.num_rows = table.num_rows
        self.lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.scalars: dict[str, Any] = {}
        self.second_dim: dict[str, int] = {}
        layout = read_layout(manifest.signals) if layout is None else layout
        widths = layout.second_dim
        scaled = scale_columns(manifest.signals)
        streams = set(layout.stream_columns)
        blobs: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # stream-group columns, decoded together below
        for name in table.column_names:
            col = one_array(table.column(name))
            if name in streams and pa.types.is_binary(col.type):
                if footer_values is not None:
                    check_value_count(name, col, footer_values)
                offsets = binary_offsets(col)
                blobs[name] = (offsets - offsets[0], np.frombuffer(col.buffers()[2] or b"", dtype=np.uint8)[offsets[0]: offsets[-1]])
            elif pa.types.is_list(col.type):
                offsets = col.offsets.to_numpy().astype(np.int64)
                if footer_values is not None:
                    check_value_count(name, col, footer_values, offsets)
                values = col.values.to_numpy(zero_copy_only=False)
                if name in codecs and not codecs[name].scaled and not (keep_float16 and name == "topk_logprobs" and values.dtype == np.float16):
                    values = codecs[name].decode(values)
                self.lists[name] = (offsets, values)
                if name in widths:
                    self.second_dim[name] = widths[name]
            elif name in scaled and pa.types.is_binary(col.type):  # int8 blobs: one per example, decoded below
                if footer_values is not None:
                    check_value_count(name, col, footer_values)
                offsets = binary_offsets(col)
                data = np.frombuffer(col.buffers()[2] or b"", dtype=np.int8)[offsets[0] : offsets[-1]]
                self.lists[name] = (offsets - offsets[0], data)
                self.second_dim[name] = widths[name]
            elif pa.types.is_string(col.type):
                self.scalars[name] = col.to_pylist()
            else:
                self.scalars[name] = col.to_numpy(zero_copy_only=False)
                if footer_values is not None:
                    check_value_count(name, col, footer_values)
        for group in layout.groups:
            mine = {c: blobs[c] for c in group.columns if c in blobs}
            if not mine:
                continue
            try:
                if topk_codes:  # the codes as they are, [positions, width] uint8 per stream: decoded on the device
                    group.positions(mine)
                    decoded = mine
                else:
                    decoded = group.decode(mine, "rank" if topk_order == "rank" else "id")
            except (ValueError, KeyError) as exc:
                raise DamagedShard(f"top-k streams do not decode: {exc}") from None
            for name, (offsets, values) in decoded.items():
                self.lists[name] = (offsets, values)
                if name in widths:
                    self.second_dim[name] = widths[name]
        for name, scale_name in scaled.items():
            if name not in self.lists:
                continue
            if scale_name not in self.lists:
                raise DamagedShard(f"column {name} is stored as int8 but its scale column {scale_name} was not read")
            (offsets, q), (scale_offsets, scale) = self.lists[name], self.lists.pop(scale_name)
            width = widths[name]
            if q.size != scale.size * width or not np.array_equal(offsets, scale_offsets * width):
                raise DamagedShard(f"column {name} holds {q.size} values, its scale column {scale_name} {scale.size} rows of {width}")
            self.lists[name] = (offsets, codecs[name].decode_rows(q.reshape(-1, width), scale).reshape(-1))

    def example(self, i: int) -> Example:
        ex: Example = {}
        for name, (offsets, values) in self.lists.items():
            v = values[offsets[i] : offsets[i + 1]]
            dim = self.second_dim.get(name)
            ex[name] = v.reshape(-1, dim) if dim else v
        for name, values in self.scalars.items():
            v = values[i]
            ex[name] = v.item() if isinstance(v, np.generic) else v
        return ex


def one_array(col: pa.ChunkedArray) -> pa.Array:
    """A column as one array; ``combine_chunks`` copies even a single chunk (a row group's column is one)."""
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def binary_offsets(col: pa.Array) -> np.ndarray:
    """A binary array's int64 byte offsets (len + 1), from its offsets buffer (pyarrow has no ``.offsets`` for it)."""
    return np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset : col.offset + len(col) + 1].astype(np.int64)


class DamagedShard(Exception):
    """Internal: a shard's bytes disagree with the manifest or with themselves (turned into CacheFormatError)."""


def check_value_count(name: str, col: pa.Array, footer_values: dict[str, int], offsets: np.ndarray | None = None) -> None:
    """A decoded column holds as many Parquet values as the footer records: one per scalar; for a list column
    one level per value plus one per empty list (``offsets``: its offsets, when the caller has them). Page CRCs
    do not cover page headers, and a damaged ``num_values`` there decodes silently shorter lists; this catches it."""
    if pa.types.is_list(col.type):
        offsets = col.offsets.to_numpy().astype(np.int64) if offsets is None else offsets
        n = int(offsets[-1] - offsets[0]) + int(np.count_nonzero(offsets[1:] == offsets[:-1]))
    else:
        n = len(col)
    if n != footer_values[name]:
        raise DamagedShard(f"column {name} decoded {n} values, the footer records {footer_values[name]}")


def regenerate_fix(manifest: Manifest | None = None) -> str:
    """The honest fix for a damaged shard: shards cannot be regenerated one at a time (a resume only appends)."""
    if manifest is not None and manifest.created_by.startswith("kdcache merge"):
        return ("regenerate the part that holds it: remove the merged manifest (CACHE/_manifest.json), rerun that part's "
                "`kdcache generate` task with --overwrite, then `kdcache merge` again (the other parts stay as they are)")
    command = "kdcache combine" if manifest is not None and manifest.created_by.startswith("kdcache combine") else "kdcache generate"
    return (
        f"regenerate the cache: rerun the `{command}` command that wrote it with --overwrite or into a new --out "
        "(a single shard cannot be rewritten in place)"
    )


def regenerate_hint(cache_path: str | Path, manifest: Manifest | None = None) -> str:
    return f"run `kdcache verify {cache_path}` to list every damaged shard, then {regenerate_fix(manifest)}"


def one_line(what: object) -> str:
    """A message as one short line, whatever pyarrow's (or the OS's) looked like."""
    text = " ".join(str(what).split()) or (type(what).__name__ if isinstance(what, BaseException) else "")
    return text if len(text) <= 240 else text[:237] + "..."


def damaged_error(cache_path: str | Path, shard: str, what: str, *, row_group: int | None = None,
                  manifest: Manifest | None = None) -> CacheFormatError:
    where = f"cache {cache_path}: shard {shard}" + (f" row group {row_group}" if row_group is not None else "")
    return CacheFormatError(f"{where} is damaged ({one_line(what)}); {regenerate_hint(cache_path, manifest)}")


def open_parquet(path: Path) -> pq.ParquetFile:
    """A shard with page checksum verification on: every page decoded is CRC-checked. A remote shard is read
    through an fsspec file, row group by row group (only the footer and the column chunks asked for are fetched)."""
    if is_remote(path):
        return pq.ParquetFile(path.open("rb"), page_checksum_verification=True)
    return pq.ParquetFile(path, page_checksum_verification=True)


def check_footer(f: pq.ParquetFile, shard, schema: pa.Schema) -> None:
    """The footer (not covered by page CRCs) must agree with the manifest: schema, rows per row group.
    Raises :class:`DamagedShard` on disagreement."""
    got = f.schema_arrow
    if not got.equals(schema):
        diff = next((f"{a.name}: {a.type}" for a, b in zip(got, schema) if not a.equals(b)), None)
        raise DamagedShard(
            f"footer schema differs from the manifest's signals ({diff or f'columns {got.names} vs {schema.names}'})"
        )
    md = f.metadata
    rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    if rows != list(shard.row_groups) or md.num_rows != shard.rows:
        raise DamagedShard(f"footer lists row groups of {rows} rows, the manifest {list(shard.row_groups)} ({shard.rows} rows)")


def footer_value_counts(f: pq.ParquetFile, group: int, names: list[str]) -> dict[str, int]:
    """Parquet values (levels) per column in one row group, from the footer. Columns are flat lists or
    scalars, so arrow field i is Parquet leaf column i."""
    rg = f.metadata.row_group(group)
    index = {name: i for i, name in enumerate(f.schema_arrow.names)}
    return {name: rg.column(index[name]).num_values for name in names}


def locate_damage(path: Path, shard, schema: pa.Schema) -> tuple[int | None, str]:
    """Where a shard whose sha256 differs is damaged: the first row group that fails to decode (page CRCs,
    value counts), else the footer, else outside the page data. Only run once a shard is known bad."""
    try:
        f = open_parquet(path)
        check_footer(f, shard, schema)
    except DamagedShard as exc:
        return None, str(exc)
    except READ_ERRORS as exc:
        return None, f"footer not readable: {exc}"
    for g in range(f.metadata.num_row_groups):
        try:
            table = f.read_row_group(g)
            counts = footer_value_counts(f, g, table.column_names)
            for name in table.column_names:
                check_value_count(name, table.column(name).combine_chunks(), counts)
        except DamagedShard as exc:
            return g, str(exc)
        except READ_ERRORS as exc:
            return g, f"Parquet read failed: {exc}"
    return None, "every row group still decodes: the damage is outside the page data (page headers, statistics or metadata)"


class Cache:
    """An opened cache: its manifest, and streams over its examples.

    ``verify_sha256`` (default on) hashes each shard the first time this object opens it and compares it
    with the manifest. At ~1.7 GB/s (SHA-NI) that is about 18% of a reader-only pass over the shard, paid
    once per shard per ``Cache`` (docs/benchmarks.md). Turning it off keeps page CRCs and the footer and
    value-count checks, which catch all but rare page-header damage (e.g. a level length in example_id's
    page header); do so only where shards are much larger than what is read of them (hidden states a
    run does not load) or the reader itself is the bottleneck.
    """

    def __init__(self, path: str | Path, *, verify_sha256: bool = True, topk_order: str = "rank", keep_float16: bool = False):
        if topk_order not in ("rank", "any"):
            raise ValueError(f"topk_order must be 'rank' or 'any', got {topk_order!r}")
        self.path = as_path(path)
        self.topk_order = topk_order
        """rank: each position's top-k most likely first (the schema's contract); any: the storage's cheapest order,
        for readers that treat the top-k as a set (the trainer's losses; ~1.5x faster decoding of a sqrt-delta cache)."""
        self.keep_float16 = keep_float16
        """True: top-k log-probs stored as fp16 come back as float16, for a reader that casts them where they are used
        (the trainer, on the device: half the host bytes and no host-side cast)."""
        self.manifest = read_manifest(self.path)
        self.verify_sha256 = verify_sha256
        self._codecs = {name: get_codec(c) for name, c in column_codecs(self.manifest.signals).items()}
        try:
            self._schema = build_schema(self.manifest.signals)
        except CacheFormatError as exc:  # an unknown signal: say which cache holds it
            raise CacheFormatError(f"cache {self.path}: {exc}") from None
        self._scales = scale_columns(self.manifest.signals)
        self._layout = read_layout(self.manifest.signals)
        self._topk_streams = self._layout.stream_columns
        self._logical = [c for g in self._layout.groups for c in g.logical]  # what the stream columns decode to
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._hashed: set[int] = set()
        self.row_groups = [
            (si, gi, n) for si, shard in enumerate(self.manifest.shards) for gi, n in enumerate(shard.row_groups)
        ]
        self.units = read_units(self.manifest)
        for shard in self.manifest.shards:
            self._check_size(shard)

    def _damaged(self, shard: str, what: str, row_group: int | None = None) -> CacheFormatError:
        return damaged_error(self.path, shard, what, row_group=row_group, manifest=self.manifest)

    def _unreachable(self, shard: str, exc: BaseException) -> KDCacheError | None:
        """A remote read cut off by the network is not damage: say so, instead of sending the user to regenerate."""
        if not (is_remote(self.path) and is_network_error(exc)):
            return None
        return KDCacheError(f"cache {self.path}: cannot read shard {shard} from the object store ({one_line(str(exc))}); check "
                            "the network, endpoint and credentials, then rerun the same command (nothing shows the cache is damaged)")

    def _missing(self, shard) -> CacheFormatError:
        return CacheFormatError(
            f"cache {self.path}: shard {shard.name} listed in the manifest is missing; {regenerate_hint(self.path, self.manifest)}"
        )

    def _check_size(self, shard) -> None:
        path = self.path / shard.name
        try:
            size = path.stat().st_size if is_remote(path) else os.stat(path).st_size
        except FileNotFoundError:
            raise self._missing(shard) from None
        if size != shard.bytes:
            raise self._damaged(
                shard.name, f"not readable Parquet of this cache: {size:,} bytes on disk, the manifest records {shard.bytes:,}; "
                "truncated or overwritten"
            )

    def __repr__(self) -> str:
        m = self.manifest
        return f"Cache({str(self.path)!r}, rows={m.num_rows}, tokens={m.num_tokens}, k={m.top_k}, status={m.status})"

    def __len__(self) -> int:
        return self.manifest.num_rows

    def __iter__(self) -> Iterator[Example]:
        return iter(self.stream())

    @property
    def tokenizer_dir(self) -> Path | None:
        """The teacher's tokenizer stored with the cache (``_tokenizer/``, or ``tokenizer/`` in a cache
        written before the rename); None if the cache holds none. A remote cache's is downloaded once into a local
        folder named by the tokenizer's fingerprint (kdcache.cache.filesystem.local_copy), which tokenizers load."""
        path = tokenizer_path(self.path)
        if not path.is_dir():
            return None
        if is_remote(path):
            return local_copy(path, str(self.manifest.tokenizer.get("fingerprint") or self.manifest.settings_hash))
        return path

    @property
    def manifest_path(self) -> Path:
        """The manifest file (``_manifest.json``, or ``manifest.json`` in a cache written before the rename)."""
        return manifest_path(self.path)

    @property
    def columns(self) -> list[str]:
        """What examples can hold: the Parquet columns, with a coded top-k's streams as the logical top-k columns."""
        names = self._file(0).schema_arrow.names if self.manifest.shards else []
        if not self._topk_streams:
            return names
        return [*(n for n in names if n not in self._topk_streams), *self._logical]

    @property
    def topk_code_columns(self) -> list[str]:
        """A coded top-k's stream columns (none for plain lists): asked for instead of the top-k columns, examples
        hold the codes, [positions, width] uint8 each, for ``storage.decode_tensors`` to decode on a device."""
        return list(self._topk_streams)

    def _file(self, shard_index: int) -> pq.ParquetFile:
        if shard_index in self._files:
            self._files.move_to_end(shard_index)
            return self._files[shard_index]
        shard = self.manifest.shards[shard_index]
        path = self.path / shard.name
        try:
            self._check_size(shard)  # again: the file may have changed since the cache was opened
            if self.verify_sha256 and shard_index not in self._hashed:
                digest = file_sha256(path)
                if digest != shard.sha256:
                    group, detail = locate_damage(path, shard, self._schema)
                    raise self._damaged(
                        shard.name, f"sha256 {digest[:12]}... differs from the manifest's {shard.sha256[:12]}...; {detail}", group
                    )
                self._hashed.add(shard_index)
            f = open_parquet(path)
            check_footer(f, shard, self._schema)
        except FileNotFoundError:
            raise self._missing(shard) from None
        except DamagedShard as exc:
            raise self._damaged(shard.name, str(exc)) from None
        except READ_ERRORS as exc:
            raise self._unreachable(shard.name, exc) or self._damaged(shard.name, f"not readable Parquet: {exc}") from None
        self._files[shard_index] = f
        if len(self._files) > 4:
            self._files.popitem(last=False)
        return f

    def _with_companions(self, columns: list[str] | None) -> list[str] | None:
        """What decoding ``columns`` needs besides them: an int8 column's scale column, the companions its signal names
        (a hidden column's ``hidden_positions``: which rows it holds), a logical column's whole stream group."""
        if columns is None:
            return None
        extra = [self._scales[c] for c in columns if c in self._scales]
        extra += [x for c in columns for x in self._layout.companions.get(c, ())]
        for group in self._layout.groups:
            if any(c in group.logical for c in columns):
                columns = [c for c in columns if c not in group.logical]  # the streams decode all of them at once
                extra += group.columns
        return [*columns, *(c for c in dict.fromkeys(extra) if c not in columns)]

    def read_block(self, row_group: int, columns: list[str] | None = None) -> RowGroupBlock:
        shard_index, group_index, rows = self.row_groups[row_group]
        f = self._file(shard_index)
        codes = columns is not None and any(c in self._topk_streams for c in columns)  # asked for by name: not decoded
        columns = self._with_companions(columns)
        try:
            table = f.read_row_group(group_index, columns=columns)
            if table.num_rows != rows:
                raise DamagedShard(f"decoded {table.num_rows} rows, the manifest records {rows}")
            return RowGroupBlock(table, self.manifest, self._codecs, footer_value_counts(f, group_index, table.column_names), self.topk_order,
                                 self.keep_float16, codes, self._layout)
        except DamagedShard as exc:
            raise self._damaged(self.manifest.shards[shard_index].name, str(exc), row_group=group_index) from None
        except READ_ERRORS as exc:
            name = self.manifest.shards[shard_index].name
            raise self._unreachable(name, exc) or self._damaged(name, f"Parquet read failed: {exc}", row_group=group_index) from None

    def stream(
        self,
        *,
        shuffle: bool = False,
        seed: int = 0,
        window: int = 4,
        epochs: int | None = 1,
        columns: list[str] | None = None,
        keep: Callable[[str], bool] | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> ExampleStream:
        """Examples as dicts of numpy arrays. ``epochs=None`` loops forever; ``keep(example_id)`` filters;
        ``rank`` of ``world`` gets every ``world``-th kept example (see :class:`ExampleStream`)."""
        if columns is not None:
            if set(columns) & set(self._topk_streams) and set(columns) & set(self._logical):
                raise ValueError("ask for the top-k columns or for their codes (topk_code_columns), not both")
            missing = sorted(set(columns) - set(self.columns) - set(self._topk_streams))
            if missing:
                raise CacheFormatError(f"cache {self.path} has no column {missing[0]}; it has: {', '.join(self.columns)}")
        if keep is not None and columns is not None and "example_id" not in columns:
            columns = ["example_id", *columns]  # the filter reads it
        return ExampleStream(self, shuffle=shuffle, seed=seed, window=window, epochs=epochs, columns=columns, keep=keep,
                             rank=rank, world=world)


def read_units(manifest: Manifest) -> list[list[int]]:
    """The row groups a reader shuffles, as lists of indices into the flat row-group list: one row group
    each, except that a row group a time-bounded commit cut short at a shard's end (``open_tokens``) is
    joined with the next shard's first one. So a cache written in one go and one stopped and resumed, or
    committed more often by a slower teacher, hold the same units and train in the same order."""
    units: list[list[int]] = []
    flat = 0
    carry = False
    for shard in manifest.shards:
        for gi in range(len(shard.row_groups)):
            if carry and gi == 0:
                units[-1].append(flat)
            else:
                units.append([flat])
            flat += 1
        carry = shard.open_tokens > 0 and bool(shard.row_groups)
    return units


class ExampleStream:
    """An iterator over a cache's examples with ``state_dict()``/``load_state_dict()``.

    Rank sharding (``rank`` of ``world``, data-parallel training): every rank walks the same global sequence (the
    seeded order, after ``keep``) and yields the kept examples whose index ``i`` (counted across epochs, from
    ``base``) has ``(i - base) % world == rank``. The ranks' streams are disjoint, together they are the global
    sequence with nothing read twice per epoch, and the n-th examples of the W ranks are the global sequence's
    examples nW .. nW + W - 1: W ranks taking B examples each per step see exactly one process's B x W. Each rank
    decodes every row group (the price of that equality: W times the decoding, the same memory)."""

    def __init__(self, cache: Cache, *, shuffle, seed, window, epochs, columns, keep, rank: int = 0, world: int = 1):
        if window < 1:
            raise ValueError("window must be >= 1")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
        self.cache = cache
        self.shuffle = shuffle
        self.seed = seed
        self.window = window
        self.epochs = epochs
        self.columns = columns
        self.keep = keep
        self.epoch = 0
        self.window_index = 0
        self.offset = 0
        self.rank, self.world = rank, world
        self.seen = 0  # kept examples of the global sequence passed so far (every rank's)
        self.base = 0  # the global index at which the dealing to ranks starts (moved by a reshard)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "window": self.window_index, "offset": self.offset, "seed": self.seed,
                "shuffle": self.shuffle, "window_size": self.window, "seen": self.seen, "base": self.base,
                "rank": self.rank, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["shuffle"], state["window_size"]) != (self.seed, self.shuffle, self.window):
            raise ValueError("reader state was saved with a different seed, shuffle or window; it cannot be restored here")
        if (state.get("rank", 0), state.get("world", 1)) != (self.rank, self.world):
            raise ValueError(f"reader state of rank {state.get('rank', 0)} of {state.get('world', 1)} cannot be restored as rank "
                             f"{self.rank} of {self.world}; reshard it first (kdcache.cache.reader.reshard_states)")
        self.epoch, self.window_index, self.offset = state["epoch"], state["window"], state["offset"]
        self.seen, self.base = state.get("seen", 0), state.get("base", 0)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _windows(self, epoch: int) -> list[np.ndarray]:
        n = len(self.cache.units)
        order = self._rng(epoch).permutation(n) if self.shuffle else np.arange(n)
        return [order[i : i + self.window] for i in range(0, n, self.window)]

    def __iter__(self) -> Iterator[Example]:
        if not self.cache.row_groups:
            return
        while self.epochs is None or self.epoch < self.epochs:
            windows = self._windows(self.epoch)
            yielded = self.window_index > 0 or self.offset > 0  # a resumed epoch had yielded before
            while self.window_index < len(windows):
                blocks = [self.cache.read_block(g, self.columns) for u in windows[self.window_index] for g in self.cache.units[int(u)]]
                index = [(b, i) for b in blocks for i in range(b.num_rows)]
                order = (
                    self._rng(self.epoch, self.window_index).permutation(len(index))
                    if self.shuffle
                    else np.arange(len(index))
                )
                while self.offset < len(order):
                    block, row = index[order[self.offset]]
                    self.offset += 1
                    if self.keep is not None and not self.keep(block.scalars["example_id"][row]):
                        continue
                    yielded = True  # by some rank: an epoch that keeps anything is never the last
                    index_ = self.seen - self.base
                    self.seen += 1
                    if index_ % self.world != self.rank:
                        continue
                    yield block.example(row)
                self.window_index += 1
                self.offset = 0
            self.epoch += 1
            self.window_index = 0
            if not yielded:
                return  # the filter keeps nothing: stop instead of looping over empty epochs forever


def reshard_states(states: list[dict], world: int) -> list[dict] | None:
    """The states of ``world`` ranks that continue the global sequence where the ranks of ``states`` (one per rank,
    in rank order) stopped; None if they stopped mid-round (not every rank has yielded as many examples), where no
    position continues every rank exactly. The example after the last one any rank yielded comes next."""
    old_world = len(states)
    base = states[0].get("base", 0)
    counts = [max(0, -(-(s.get("seen", 0) - base - r) // old_world)) for r, s in enumerate(states)]
    if len(set(counts)) != 1 or any(s.get("world", 1) != old_world or s.get("rank", 0) != r for r, s in enumerate(states)):
        return None
    frontier = states[-1]
    seen = frontier.get("seen", 0)
    if seen != base + counts[0] * old_world:
        return None
    return [{**frontier, "seen": seen, "base": seen, "rank": r, "world": world} for r in range(world)]


def open_cache(path: str | Path, *, verify_sha256: bool = True, topk_order: str = "rank", keep_float16: bool = False) -> Cache:
    """Open a cache directory written by ``kdcache generate`` (see :class:`Cache` for the options)."""
    return Cache(path, verify_sha256=verify_sha256, topk_order=topk_order, keep_float16=keep_float16)


def holdout_fraction_filter(fraction: float, salt: str = "kdcache-eval") -> Callable[[str], bool]:
    """A stable split on ``example_id``: True for the held-out ``fraction``, the same on every machine."""

    def is_heldout(example_id: str) -> bool:
        base = example_id.split("#", 1)[0]  # samples of one prompt stay on one side
        h = hashlib.blake2b(f"{salt}:{base}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2**64 < fraction

    return is_heldout
