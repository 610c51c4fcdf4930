"""What a signal is to the cache: a manifest entry made from its settings, the Arrow columns it adds, how the reader
shapes and groups them, and what ``verify --deep`` checks of its rows.

A signal's manifest entry is a dict with a ``columns`` dict (column name -> ``{"shape", "dtype", "codec", ...}``) and
whatever parameters its readers need; everything below is a function of that entry alone, so a cache reads with the
manifest and no settings. Subclasses override only what differs from the generic column rules in :func:`arrow_field`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from kdcache.cache.codecs import get_codec


def column(shape: list, dtype: str, codec: str | None = "plain", **extra) -> dict:
    """A column's manifest description; keys in the order every manifest has had them (shape, dtype, codec, extras)."""
    return {"shape": list(shape), "dtype": dtype, **({"codec": codec} if codec is not None else {}), **extra}


def coded_columns(name: str, rows: str, width: int, codec: str) -> dict:
    """A [rows, width] float column through ``codec``; a scaled codec adds its ``<name>_scale`` column after it."""
    c = get_codec(codec)
    cols = {name: column([rows, width], str(c.arrow_type), c.name)}
    if c.scaled:
        # One binary blob per example: Parquet has no 8-bit physical type and stores list<int8> as INT32
        # (zstd then leaves ~1.4 bytes per value at D = 192); the blob is exactly one byte per value.
        cols[name]["layout"] = "binary"
        cols[name]["scale_column"] = f"{name}_scale"
        cols[f"{name}_scale"] = column([rows], "float32", "plain", scale_of=name)
    return cols


def arrow_field(name: str, col: Mapping) -> pa.Field:
    """The generic column rule: binary layout -> binary; shape [] -> a scalar of ``dtype``; else a list of the codec's
    Arrow type (``dtype`` itself for plain)."""
    if col.get("layout") == "binary":
        return pa.field(name, pa.binary(), nullable=False)
    codec = col.get("codec", "plain")
    value_type = pa.type_for_alias(col["dtype"]) if codec == "plain" else get_codec(codec).arrow_type
    return pa.field(name, value_type if list(col["shape"]) == [] else pa.list_(value_type), nullable=False)


@dataclass
class StreamGroup:
    """Physical columns decoded together into logical ones (a coded top-k's byte planes): the writer encodes all of a
    row group's examples at once, the reader decodes them at once, or hands out the codes when asked for by name."""

    columns: list[str]
    logical: list[str]
    encode: Callable[[Sequence[Mapping[str, Any]]], dict[str, pa.Array]]
    decode: Callable[[Mapping[str, tuple], str], dict[str, tuple[np.ndarray, np.ndarray]]]
    positions: Callable[[Mapping[str, tuple]], np.ndarray]
    """Checks that the streams agree with each other (raises ValueError/KeyError) and returns positions per example."""


@dataclass
class Rows:
    """One decoded row group as ``verify --deep`` sees it: per list/binary column its lengths and offsets, per column
    its flat values (binary columns: none), T per row, and the named dimensions signals add (``P``, ``sum(sizes)``)."""

    table: pa.Table
    lengths: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    offsets: dict[str, np.ndarray]
    dims: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.table.num_rows

    @property
    def T(self) -> np.ndarray:
        return self.lengths["input_ids"]

    def bad_row(self, mask: np.ndarray, what) -> None:
        """Raise (as ValueError, turned into a damaged-shard problem) naming the first row where ``mask`` holds."""
        if np.any(mask):
            i = int(np.argmax(mask))
            ex_id = self.table.column("example_id")[i].as_py() if "example_id" in self.table.column_names else "?"
            raise RowProblem(f"row {i} (example {ex_id!r}): {what(i) if callable(what) else what}")

    def check_vocab(self, name: str, vocab) -> None:
        """Token ids of list column ``name`` inside [0, vocab) (only >= 0 when the vocabulary size is unknown)."""
        if name in self.values and self.values[name].size:
            out = self.values[name] < 0
            if vocab:
                out |= self.values[name] >= int(vocab)
            if np.any(out):
                row = int(np.searchsorted(self.offsets[name], int(np.argmax(out)), side="right") - 1)
                self.bad_row(np.arange(self.n) == row, f"{name} outside the vocabulary [0, {vocab})")


class RowProblem(ValueError):
    """A row breaks an invariant of its signal (verify reports it as damage of that row group)."""


class Signal:
    """A signal's behaviour; one instance per signal, registered by name (kdcache/cache/signals/registry.py)."""

    name: str = ""
    schema_rank: int = 1000
    """Where its columns go in the Parquet schema (ascending; ties: registration order). Shipped signals keep the
    column order caches have always had; a new signal's default puts its columns last."""

    def entry(self, settings: Mapping[str, Any]) -> dict:
        """The manifest entry (``signals.<name>``) for these settings; must hold ``columns``."""
        raise NotImplementedError

    def arrow_fields(self, entry: Mapping) -> list[pa.Field]:
        return [arrow_field(name, col) for name, col in entry.get("columns", {}).items()]

    def format_version(self, entry: Mapping) -> int:
        """The cache format its storage needs (the cache's is the highest of its signals')."""
        return 1

    def second_dims(self, entry: Mapping) -> dict[str, int]:
        """Columns the reader hands out as [rows, width]: name -> width (default: shapes [rows, <int>])."""
        out = {}
        for name, col in entry.get("columns", {}).items():
            shape = col.get("shape", [])
            if len(shape) == 2 and isinstance(shape[1], int):
                out[name] = int(shape[1])
        return out

    def companions(self, entry: Mapping) -> dict[str, list[str]]:
        """Column -> other columns the reader must read along to decode it (besides a scaled codec's scale)."""
        return {}

    def stream_group(self, entry: Mapping) -> StreamGroup | None:
        return None

    def dims(self, entry: Mapping, rows: Rows) -> dict[str, np.ndarray]:
        """Named per-row dimensions its column shapes use besides T and T-1 (verify sizes every column with them)."""
        return {}

    def check_rows(self, entry: Mapping, rows: Rows) -> None:
        """Invariants of its values in one row group (raise through ``rows.bad_row``); shapes are checked already."""
