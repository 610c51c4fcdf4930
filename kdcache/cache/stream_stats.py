"""Exact statistics of per-example columns in bounded memory: one row group in memory at a time, never the cache.

``inspect`` summarises a cache by its per-example teacher NLL and entropy. Holding those columns for every row grows
with the cache, so :func:`column_summaries` reads them in passes over the row groups instead, each pass keeping only
running aggregates: (1) count, sum, min and max; (2) two fixed-size histograms over [min, max], a fine one
(``FINE_BINS``) and the plot's (``plot_bins``, the same bins ``numpy.histogram(x, plot_bins)`` gives); (3) the values
that fall in the fine bins holding the order statistics a quantile needs, which are then sorted. A bin holding more
than ``max_collect`` values is histogrammed again inside its own range (another pass) until it does not, so memory
stays bounded whatever the distribution. The quantiles are exact: numpy's default (linear) ``percentile`` of all
values, not a sketch's approximation. Non-finite values (an encoder teacher's NaN NLL) are left out, as
``numpy.isfinite`` filters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

FINE_BINS = 4096
MAX_COLLECT = 1 << 20  # values gathered at most per order statistic before refining instead (8 MiB of float64)

Chunks = Callable[[], Iterator[dict[str, np.ndarray]]]
"""Re-iterable source: each call yields the row groups again, as {column: values of that row group}."""


@dataclass
class ColumnSummary:
    """What inspect reports of one column: count of finite values, mean, requested percentiles and the plot's histogram."""

    count: int = 0
    mean: float = math.nan
    percentiles: dict[float, float] = field(default_factory=dict)
    hist_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    hist_edges: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _bin_of(x: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """numpy.histogram's bin of each x in [lo, hi] (half-open bins, the last one closed)."""
    edges = np.linspace(lo, hi, bins + 1)
    return np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)


def _finite(chunks: Chunks, name: str) -> Iterator[np.ndarray]:
    for chunk in chunks():
        x = np.asarray(chunk[name], dtype=np.float64)
        yield x[np.isfinite(x)]


def _order_statistics(chunks: Chunks, name: str, ranks: Iterable[int], lo: float, hi: float, max_collect: int) -> dict[int, float]:
    """The values of the given 0-based ranks among the finite values of ``name``, whose smallest is ``lo`` and
    largest ``hi``. Each rank is looked for in a closed range [a, b] whose ends are values of the column; a fine
    histogram of the range (with each bin's smallest and largest value) narrows it to one bin's [min, max]."""
    pending = [(r, lo, hi, r) for r in sorted(set(ranks))]  # (rank within [a, b], a, b, rank overall)
    found: dict[int, float] = {}
    while pending:
        collect, refine = [], []
        for rank, a, b, overall in pending:
            if a == b:
                found[overall] = a  # every value in the range is this number
            else:
                collect.append((rank, a, b, overall))
        ranges = list(dict.fromkeys((a, b) for _, a, b, _ in collect))
        if not ranges:
            break
        # one pass: per range, each fine bin's count, smallest and largest value
        counts = {rg: np.zeros(FINE_BINS, dtype=np.int64) for rg in ranges}
        mins = {rg: np.full(FINE_BINS, np.inf) for rg in ranges}
        maxs = {rg: np.full(FINE_BINS, -np.inf) for rg in ranges}
        for x in _finite(chunks, name):
            for rg in ranges:
                v = x[(x >= rg[0]) & (x <= rg[1])]
                k = _bin_of(v, rg[0], rg[1], FINE_BINS)
                counts[rg] += np.bincount(k, minlength=FINE_BINS)
                np.minimum.at(mins[rg], k, v)
                np.maximum.at(maxs[rg], k, v)
        gather = []
        for rank, a, b, overall in collect:
            c = counts[(a, b)]
            cum = np.cumsum(c)
            k = int(np.searchsorted(cum, rank, side="right"))  # the bin holding the rank-th value of the range
            sub = (rank - (int(cum[k - 1]) if k else 0), float(mins[(a, b)][k]), float(maxs[(a, b)][k]), overall)
            # no narrowing happens only when [a, b] spans fewer floats than bins: then gather it whatever its size
            if sub[1] == sub[2] or c[k] <= max_collect or (sub[1], sub[2]) == (a, b):
                gather.append(sub)
            else:
                refine.append(sub)
        gather_ranges = {(a, b): [] for _, a, b, _ in gather if a != b}
        for _, a, b, overall in gather:
            if a == b:
                found[overall] = a
        if gather_ranges:  # one pass: the values of each chosen bin, sorted, give the rank
            for x in _finite(chunks, name):
                for (a, b), parts in gather_ranges.items():
                    parts.append(x[(x >= a) & (x <= b)])
            for rank, a, b, overall in gather:
                if a != b:
                    found[overall] = float(np.sort(np.concatenate(gather_ranges[(a, b)]))[rank])
        pending = refine
    return found


def column_summaries(chunks: Chunks, names: list[str], percentiles: tuple[float, ...] = (10, 50, 90), plot_bins: int = 40,
                     max_collect: int = MAX_COLLECT) -> dict[str, ColumnSummary]:
    """Exact count, mean, ``percentiles`` (numpy's linear method) and a ``plot_bins`` histogram of each column's finite
    values, reading ``chunks()`` a few times and never more than one chunk's values at once (plus ``max_collect``)."""
    n = {c: 0 for c in names}
    total = {c: 0.0 for c in names}
    lo = {c: math.inf for c in names}
    hi = {c: -math.inf for c in names}
    for chunk in chunks():
        for c in names:
            x = np.asarray(chunk[c], dtype=np.float64)
            x = x[np.isfinite(x)]
            if len(x):
                n[c] += len(x)
                total[c] += float(x.sum())
                lo[c], hi[c] = min(lo[c], float(x.min())), max(hi[c], float(x.max()))
    out = {c: ColumnSummary(count=n[c]) for c in names}
    live = [c for c in names if n[c]]
    if not live:
        return out
    hists = {c: np.zeros(plot_bins, dtype=np.int64) for c in live}
    for chunk in chunks():
        for c in live:
            x = np.asarray(chunk[c], dtype=np.float64)
            x = x[np.isfinite(x)]
            hists[c] += np.histogram(x, bins=plot_bins, range=(lo[c], hi[c]) if hi[c] > lo[c] else None)[0] if len(x) else 0
    for c in live:
        s = out[c]
        s.mean = total[c] / n[c]
        s.hist_counts = hists[c]
        s.hist_edges = np.histogram_bin_edges([lo[c], hi[c]], bins=plot_bins, range=(lo[c], hi[c]) if hi[c] > lo[c] else None)
        # numpy's linear percentile: the value at position q/100 * (n - 1), between two order statistics
        where = {q: q / 100 * (n[c] - 1) for q in percentiles}
        ranks = {r for p in where.values() for r in (math.floor(p), min(math.floor(p) + 1, n[c] - 1))}
        stats = _order_statistics(chunks, c, ranks, lo[c], hi[c], max_collect)
        for q, p in where.items():
            below, above = stats[math.floor(p)], stats[min(math.floor(p) + 1, n[c] - 1)]
            t = p - math.floor(p)  # numpy's lerp, written from the far end when t >= 0.5 (same rounding)
            s.percentiles[q] = below + (above - below) * t if t < 0.5 else above - (above - below) * (1 - t)
    return out
