"""Streaming cache reader: row group at a time, constant memory, seeded shuffle, resumable.

Shuffling is two-level and fully determined by ``(seed, epoch)``: the row groups are permuted, then
taken ``window`` at a time and the rows inside a window permuted. Memory is bounded by the window, not
the cache, and a position is just ``(epoch, window, offset)``: restoring it re-reads one window and
re-derives the same permutation, so a resumed run sees exactly the examples it would have seen.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.cache.codecs import get_codec
from kdcache.cache.manifest import TOKENIZER_DIR, Manifest, read_manifest
from kdcache.cache.schema import column_codecs
from kdcache.errors import CacheFormatError

Example = dict[str, Any]

# Columns reshaped to 2-D on read: name -> function of the manifest giving the trailing dimension.
_SECOND_DIM: dict[str, Callable[[Manifest], int]] = {
    "topk_ids": lambda m: m.top_k,
    "topk_logprobs": lambda m: m.top_k,
}


class RowGroupBlock:
    """One decoded row group: for list columns flat values + offsets, for scalars an array."""

    def __init__(self, table: pa.Table, manifest: Manifest, codecs: dict):
        self.num_rows = table.num_rows
        self.lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.scalars: dict[str, Any] = {}
        self.second_dim: dict[str, int] = {}
        hidden = manifest.signals.get("hidden") or {}
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            if pa.types.is_list(col.type):
                offsets = col.offsets.to_numpy().astype(np.int64)
                values = col.values.to_numpy(zero_copy_only=False)
                if name in codecs:
                    values = codecs[name].decode(values)
                self.lists[name] = (offsets, values)
                if name in _SECOND_DIM:
                    self.second_dim[name] = _SECOND_DIM[name](manifest)
                elif name.startswith("hidden_"):
                    self.second_dim[name] = int(hidden["size"])
            elif pa.types.is_string(col.type):
                self.scalars[name] = col.to_pylist()
            else:
                self.scalars[name] = col.to_numpy(zero_copy_only=False)

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


class Cache:
    """An opened cache: its manifest, and streams over its examples."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._codecs = {name: get_codec(c) for name, c in column_codecs(self.manifest.signals).items()}
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self.row_groups = [
            (si, gi, n) for si, shard in enumerate(self.manifest.shards) for gi, n in enumerate(shard.row_groups)
        ]

    def __repr__(self) -> str:
        m = self.manifest
        return f"Cache({str(self.path)!r}, rows={m.num_rows}, tokens={m.num_tokens}, k={m.top_k}, status={m.status})"

    def __len__(self) -> int:
        return self.manifest.num_rows

    def __iter__(self) -> Iterator[Example]:
        return iter(self.stream())

    @property
    def tokenizer_dir(self) -> Path | None:
        path = self.path / TOKENIZER_DIR
        return path if path.is_dir() else None

    @property
    def columns(self) -> list[str]:
        return self._file(0).schema_arrow.names if self.manifest.shards else []

    def _file(self, shard_index: int) -> pq.ParquetFile:
        if shard_index in self._files:
            self._files.move_to_end(shard_index)
            return self._files[shard_index]
        shard = self.manifest.shards[shard_index]
        path = self.path / shard.name
        try:
            f = pq.ParquetFile(path)
        except FileNotFoundError:
            raise CacheFormatError(f"shard {path} listed in the manifest is missing; the cache is damaged, regenerate it") from None
        except pa.ArrowInvalid as exc:
            raise CacheFormatError(f"shard {path} is not readable Parquet ({exc}); the cache is damaged, regenerate it") from None
        self._files[shard_index] = f
        if len(self._files) > 4:
            self._files.popitem(last=False)
        return f

    def read_block(self, row_group: int, columns: list[str] | None = None) -> RowGroupBlock:
        shard_index, group_index, _ = self.row_groups[row_group]
        table = self._file(shard_index).read_row_group(group_index, columns=columns)
        return RowGroupBlock(table, self.manifest, self._codecs)

    def stream(
        self,
        *,
        shuffle: bool = False,
        seed: int = 0,
        window: int = 4,
        epochs: int | None = 1,
        columns: list[str] | None = None,
        keep: Callable[[str], bool] | None = None,
    ) -> ExampleStream:
        """Examples as dicts of numpy arrays. ``epochs=None`` loops forever; ``keep(example_id)`` filters."""
        if columns is not None:
            missing = sorted(set(columns) - set(self.columns))
            if missing:
                raise CacheFormatError(f"cache {self.path} has no column {missing[0]}; it has: {', '.join(self.columns)}")
        if keep is not None and columns is not None and "example_id" not in columns:
            columns = ["example_id", *columns]  # the filter reads it
        return ExampleStream(self, shuffle=shuffle, seed=seed, window=window, epochs=epochs, columns=columns, keep=keep)


class ExampleStream:
    """An iterator over a cache's examples with ``state_dict()``/``load_state_dict()``."""

    def __init__(self, cache: Cache, *, shuffle, seed, window, epochs, columns, keep):
        if window < 1:
            raise ValueError("window must be >= 1")
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

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "window": self.window_index, "offset": self.offset, "seed": self.seed,
                "shuffle": self.shuffle, "window_size": self.window}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["shuffle"], state["window_size"]) != (self.seed, self.shuffle, self.window):
            raise ValueError("reader state was saved with a different seed, shuffle or window; it cannot be restored here")
        self.epoch, self.window_index, self.offset = state["epoch"], state["window"], state["offset"]

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _windows(self, epoch: int) -> list[np.ndarray]:
        n = len(self.cache.row_groups)
        order = self._rng(epoch).permutation(n) if self.shuffle else np.arange(n)
        return [order[i : i + self.window] for i in range(0, n, self.window)]

    def __iter__(self) -> Iterator[Example]:
        if not self.cache.row_groups:
            return
        while self.epochs is None or self.epoch < self.epochs:
            windows = self._windows(self.epoch)
            yielded = self.window_index > 0 or self.offset > 0  # a resumed epoch had yielded before
            while self.window_index < len(windows):
                blocks = [self.cache.read_block(int(g), self.columns) for g in windows[self.window_index]]
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
                    yielded = True
                    yield block.example(row)
                self.window_index += 1
                self.offset = 0
            self.epoch += 1
            self.window_index = 0
            if not yielded:
                return  # the filter keeps nothing: stop instead of looping over empty epochs forever


def open_cache(path: str | Path) -> Cache:
    """Open a cache directory written by ``kdcache generate``."""
    return Cache(path)


def holdout_fraction_filter(fraction: float, salt: str = "kdcache-eval") -> Callable[[str], bool]:
    """A stable split on ``example_id``: True for the held-out ``fraction``, the same on every machine."""

    def is_heldout(example_id: str) -> bool:
        base = example_id.split("#", 1)[0]  # samples of one prompt stay on one side
        h = hashlib.blake2b(f"{salt}:{base}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2**64 < fraction

    return is_heldout
