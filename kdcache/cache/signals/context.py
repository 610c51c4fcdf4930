"""``context``: the teacher read a context (template, alignment: the settings, kept as they are) before each row;
``context_tokens`` says how many teacher tokens it took, so row position t is teacher position context_tokens + t."""

from __future__ import annotations

from typing import Mapping

from kdcache.cache.signals.base import Signal, column
from kdcache.cache.signals.registry import register

CONTEXT_COLUMN = "context_tokens"


class Context(Signal):
    name = "context"
    schema_rank = 70

    def entry(self, s: Mapping) -> dict:
        return {**s, "columns": {CONTEXT_COLUMN: column([], "int32", None)}}


register(Context())
