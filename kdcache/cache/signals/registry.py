"""The signals a cache can hold, by name: one source of truth for the schema, the writer, the reader and verify.

``register(signal)`` adds one (a duplicate name is an error); ``get(name)`` raises a one-line error listing the known
names; ``build_signals`` makes the manifest's ``signals`` from per-signal settings; ``read_layout`` is what the reader
and writer need of a cache's signals (widths, companions, stream groups), computed once per cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from kdcache.cache.signals.base import Signal, StreamGroup
from kdcache.errors import CacheFormatError

_SIGNALS: dict[str, Signal] = {}


def register(signal: Signal) -> Signal:
    if not signal.name:
        raise ValueError(f"{type(signal).__name__} has no name; set its class attribute name")
    if signal.name in _SIGNALS:
        raise ValueError(f"signal {signal.name!r} is already registered ({type(_SIGNALS[signal.name]).__name__})")
    _SIGNALS[signal.name] = signal
    return signal


def unregister(name: str) -> None:
    """Remove a signal (for tests that register one of their own)."""
    _SIGNALS.pop(name, None)


def names() -> list[str]:
    return list(_SIGNALS)


def get(name: str) -> Signal:
    try:
        return _SIGNALS[name]
    except KeyError:
        raise CacheFormatError(
            f"unknown signal {name!r} (known: {', '.join(sorted(_SIGNALS))}); a cache holding it was written by a kdcache "
            "that defines it: upgrade kdcache, or import the module that registers it (kdcache.cache.signals.register)"
        ) from None


def build_signals(settings: Mapping[str, Mapping[str, Any]]) -> dict:
    """{signal name: its settings} -> the manifest's ``signals``, in the given order."""
    return {name: get(name).entry(s) for name, s in settings.items()}


def ordered(signals: Mapping[str, Mapping]) -> list[tuple[Signal, Mapping]]:
    """The signals of a manifest with their entries, in schema order; unknown names raise one line."""
    index = {n: i for i, n in enumerate(_SIGNALS)}
    pairs = [(get(name), entry) for name, entry in signals.items()]
    return sorted(pairs, key=lambda p: (p[0].schema_rank, index[p[0].name]))


@dataclass
class ReadLayout:
    """How a cache's columns are read: [rows, width] widths, companion columns, and stream groups."""

    second_dim: dict[str, int] = field(default_factory=dict)
    companions: dict[str, list[str]] = field(default_factory=dict)
    groups: list[StreamGroup] = field(default_factory=list)

    @property
    def stream_columns(self) -> list[str]:
        return [c for g in self.groups for c in g.columns]


def read_layout(signals: Mapping[str, Mapping]) -> ReadLayout:
    layout = ReadLayout()
    for signal, entry in ordered(signals):
        layout.second_dim.update(signal.second_dims(entry))
        layout.companions.update(signal.companions(entry))
        group = signal.stream_group(entry)
        if group is not None:
            layout.groups.append(group)
    return layout
