"""Dataset fields kept in the cache as they are (``generate --set keep_fields=[...]``).

A student may need more of a row than its tokens: a class label for a classifier, the path of an image
paired with the text, a task name. They travel in the cache as plain scalar Parquet columns (DuckDB and
pandas read them directly), typed by the first row so the schema is explicit before anything is written.
"""

from __future__ import annotations

from typing import Any

from kdcache.cache.schema import (
    BASE_COLUMNS, CLASS_LOGITS_COLUMN, CONTEXT_COLUMN, GENERATION_COLUMNS, HIDDEN_POSITIONS_COLUMN, STATS_COLUMNS,
)
from kdcache.errors import ConfigError

# The cache's own column names (from the schema's constants), and the prefixes of its per-layer and signal columns.
_RESERVED = {*BASE_COLUMNS, *STATS_COLUMNS, *GENERATION_COLUMNS, CONTEXT_COLUMN, CLASS_LOGITS_COLUMN, HIDDEN_POSITIONS_COLUMN}
_RESERVED_PREFIXES = ("hidden_", "qkv_", "pooled_", "topk_", "sampled_", "tail_")


def _kind(value: Any) -> str | None:
    for name, py in (("bool", bool), ("int", int), ("float", float), ("str", str)):  # bool first: True is an int too
        if isinstance(value, py):
            return name
    return None


def kept_field_types(names: list[str], first_row: dict) -> dict[str, str]:
    """Field -> its kind (a key of FIELD_TYPES), from the first row; a one-line ConfigError for a field that is
    missing, not a scalar, or named like a cache column."""
    kinds: dict[str, str] = {}
    for name in names:
        if name in _RESERVED or name.startswith(_RESERVED_PREFIXES):
            raise ConfigError(f"keep_fields: {name!r} is the name of a cache column; rename the dataset field")
        if name not in first_row:
            raise ConfigError(f"keep_fields: {name!r} is not a field of the dataset (it has {sorted(first_row)}); fix the name")
        kind = _kind(first_row[name])
        if kind is None:
            raise ConfigError(f"keep_fields: field {name!r} is {type(first_row[name]).__name__} in row 0; only text, integer, float "
                              "and bool fields can be kept (store a path for an image or array)")
        kinds[name] = kind
    if len(kinds) != len(names):
        raise ConfigError(f"keep_fields lists a field twice: {names}")
    return kinds


def field_value(row: dict, name: str, kind: str) -> Any:
    """The row's value of a kept field, or None when it is missing or of another kind (an int where floats are
    kept is a float)."""
    value = row.get(name)
    got = _kind(value)
    if got == kind:
        return value
    if kind == "float" and got == "int":
        return float(value)
    return None
