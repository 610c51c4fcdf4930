"""``generation``: rows that are teacher continuations: the prompt's length and which of the n samples a row is."""

from __future__ import annotations

from typing import Mapping

from kdcache.cache.signals.base import Signal, column
from kdcache.cache.signals.registry import register

GENERATION_COLUMNS = ("prompt_length", "sample_index")


class Generation(Signal):
    name = "generation"
    schema_rank = 60

    def entry(self, s: Mapping) -> dict:
        return {"columns": {c: column([], "int32", None) for c in GENERATION_COLUMNS}}


register(Generation())
