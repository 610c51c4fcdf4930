"""``fields``: dataset fields kept as they are (e.g. a label). Settings: ``fields``, name -> a kind of FIELD_TYPES,
which is the column's manifest ``dtype`` (not an Arrow alias: the kind picks the Arrow type)."""

from __future__ import annotations

from typing import Mapping

import pyarrow as pa

from kdcache.cache.signals.base import Signal, column
from kdcache.cache.signals.registry import register

#: Arrow types of kept dataset fields, by the Python type of the first row's value (bool before int: a bool is an int).
FIELD_TYPES = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string()}


class Fields(Signal):
    name = "fields"
    schema_rank = 100

    def entry(self, s: Mapping) -> dict:
        return {"columns": {name: column([], kind, None) for name, kind in s["fields"].items()}}

    def arrow_fields(self, entry: Mapping) -> list[pa.Field]:
        return [pa.field(name, FIELD_TYPES[col["dtype"]], nullable=False) for name, col in entry.get("columns", {}).items()]


register(Fields())
