"""``classes``: a classifier teacher's logits per example (``class_logits``), in the order of ``labels``."""

from __future__ import annotations

from typing import Mapping

from kdcache.cache.signals.base import Signal, column
from kdcache.cache.signals.registry import register

CLASS_LOGITS_COLUMN = "class_logits"


class Classes(Signal):
    name = "classes"
    schema_rank = 90

    def entry(self, s: Mapping) -> dict:
        labels = list(s["labels"])
        return {"labels": labels, "columns": {CLASS_LOGITS_COLUMN: column([len(labels)], "float32")}}


register(Classes())
