"""The cache's signals, one module per signal, each registering itself (registry.py); base.py says what a signal
defines. Importing this package registers every shipped signal."""

from kdcache.cache.signals.base import Rows, Signal, StreamGroup, arrow_field, coded_columns, column
from kdcache.cache.signals.registry import ReadLayout, build_signals, get, names, ordered, read_layout, register, unregister
from kdcache.cache.signals import (  # noqa: F401  (registration, in the manifest order make_signals uses)
    stats, topk, sampled, hidden, qkv, generation, context, pooled, classes, fields,
)

__all__ = ["ReadLayout", "Rows", "Signal", "StreamGroup", "arrow_field", "build_signals", "coded_columns", "column", "get",
           "names", "ordered", "read_layout", "register", "unregister"]
