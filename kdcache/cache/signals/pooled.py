"""``pooled``: one float32 vector per example per layer, hidden_states[L] pooled over the row's tokens.

Settings: ``layers``, ``pooling`` (mean or last), ``size``."""

from __future__ import annotations

from typing import Mapping

from kdcache.cache.signals.base import Signal, column
from kdcache.cache.signals.registry import register


def pooled_column(layer: int) -> str:
    return f"pooled_{layer}"


class Pooled(Signal):
    name = "pooled"
    schema_rank = 80

    def entry(self, s: Mapping) -> dict:
        size = int(s["size"])
        return {
            "layers": list(s["layers"]), "pooling": s["pooling"], "size": size,
            "tensor": f"hidden_states[L] ({s['pooling']} over the row's tokens), float32",
            "columns": {pooled_column(layer): column([size], "float32") for layer in s["layers"]},
        }


register(Pooled())
