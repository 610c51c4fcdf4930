"""Streamed per-example statistics (kdcache/cache/stream_stats.py) equal numpy over all values at once: mean,
numpy's linear percentiles and numpy.histogram's 40 bins, for awkward distributions, many small chunks, NaNs,
and a collection cap small enough that every quantile goes through the refining passes."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.cache.stream_stats import column_summaries

rng = np.random.default_rng(0)
CASES = {
    "normal": rng.normal(2.0, 1.0, 5000),
    "heavy_tail": np.exp(rng.normal(0, 3, 4000)),
    "ties": rng.integers(0, 3, 3001).astype(float),  # thousands of equal values in one bin
    "one_outlier": np.concatenate([np.full(2000, 1.5), [1e9]]),
    "constant": np.full(17, 0.25),
    "single": np.array([3.0]),
    "with_nan": np.where(rng.random(3000) < 0.2, np.nan, rng.gamma(2.0, 1.0, 3000)),
    "tiny_spread": 1.0 + rng.random(2000) * 1e-12,
}


def chunked(x: np.ndarray, size: int):
    return lambda: ({"v": x[i:i + size]} for i in range(0, len(x), size))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("max_collect", [1 << 20, 7])
def test_streamed_summary_equals_numpy_over_everything(name, max_collect):
    x = CASES[name]
    s = column_summaries(chunked(x, 113), ["v"], max_collect=max_collect)["v"]
    f = x[np.isfinite(x)]
    assert s.count == len(f)
    assert s.mean == pytest.approx(float(f.mean()), rel=1e-12)
    assert s.percentiles == {q: float(np.percentile(f, q)) for q in (10, 50, 90)}  # exact, not approximately
    counts, edges = np.histogram(f, bins=40)
    assert np.array_equal(s.hist_counts, counts) and np.allclose(s.hist_edges, edges, rtol=0, atol=1e-12 * max(1, abs(edges).max()))


def test_no_finite_values_gives_an_empty_summary():
    s = column_summaries(chunked(np.full(10, np.nan), 3), ["v"])["v"]
    assert s.count == 0 and s.percentiles == {} and len(s.hist_counts) == 0


def test_reads_only_one_chunk_at_a_time_and_a_few_passes():
    """The source is a generator of chunks: the summary never asks for them all at once, and reads a fixed
    number of passes (moments, histograms, order statistics) when the cap is not hit."""
    x = rng.normal(size=10_000)
    passes = []

    def chunks():
        passes.append(0)
        for i in range(0, len(x), 500):
            passes[-1] += 1
            yield {"v": x[i:i + 500]}

    column_summaries(chunks, ["v"])
    assert passes == [20, 20, 20, 20]  # moments, plot histograms, fine histograms, gather
