"""kdcache.cache.topk_codec: round trips (id sets, values within the documented error, proper k+1 distributions),
every vocabulary size, edge rows, refusals, and the KL bound against an independent float64 reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.cache import topk_codec as tc


def distinct_ids(rng: np.random.Generator, n: int, k: int, vocab: int) -> np.ndarray:
    """[n, k] ids, distinct within each row, in [0, vocab), in random (not sorted) order."""
    if vocab <= 4 * k:
        return np.stack([rng.permutation(vocab)[:k] for _ in range(n)]) if n else np.zeros((0, k), np.int64)
    rows = []
    for _ in range(n):
        row = np.unique(rng.integers(0, vocab, 2 * k + 8, dtype=np.int64))
        while len(row) < k:
            row = np.unique(np.concatenate([row, rng.integers(0, vocab, k, dtype=np.int64)]))
        rows.append(rng.permutation(row)[:k])
    return np.stack(rows) if n else np.zeros((0, k), np.int64)


def topk_rows(rng: np.random.Generator, n: int, k: int, vocab: int, zeros: float = 0.0, ties: float = 0.0, no_tail: bool = False):
    """LM-shaped top-k rows (Zipf-like masses, sorted descending, tail = the rest) as fp32 log-probs, plus the
    float64 reference distribution [n, k+1] they came from. ``zeros``/``ties``: fraction of -inf / repeated values."""
    w = rng.pareto(1.2, (n, k + 1)) * np.exp(rng.normal(0, 2, (n, 1)) * rng.random((n, k + 1)))
    w[:, :k] = -np.sort(-w[:, :k], axis=1)
    if ties:
        tie = rng.random((n, k)) < ties
        w[:, :k] = np.where(tie, np.roll(w[:, :k], 1, axis=1), w[:, :k])
        w[:, :k] = -np.sort(-w[:, :k], axis=1)
    if zeros:
        w[:, 1:k] = np.where(rng.random((n, k - 1)) < zeros, 0.0, w[:, 1:k])
    if no_tail:
        w[:, k] = 0.0
    w[:, 0] = np.maximum(w[:, 0], 1e-3)  # every row keeps some mass
    p = w / w.sum(1, keepdims=True)
    with np.errstate(divide="ignore"):
        lp = np.log(p).astype(np.float32)
    return distinct_ids(rng, n, k, vocab), lp[:, :k], lp[:, k], p


def reference_kl(p_rank: np.ndarray, ids: np.ndarray, dec_ids: np.ndarray, dec_lp: np.ndarray, dec_tail: np.ndarray) -> np.ndarray:
    """KL(p || q) per row over the k+1 buckets, float64, matching buckets by id (not by the codec's order)."""
    n, k = ids.shape
    q = np.empty_like(p_rank)
    for i in range(n):  # a plain loop: independent of the codec's vectorised gathers
        where = {int(t): j for j, t in enumerate(dec_ids[i])}
        q[i, :k] = [np.exp(np.float64(dec_lp[i, where[int(t)]])) for t in ids[i]]
    q[:, k] = np.exp(dec_tail.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p_rank > 0, p_rank * (np.log(p_rank) - np.log(q)), 0.0)
    return terms.sum(1)


def roundtrip(ids, lp, tail, params, order="id"):
    streams = tc.encode(ids, lp, tail, params)
    assert set(streams) == set(tc.stream_widths(params))
    return streams, tc.decode({n: bytes(s) for n, s in streams.items()}, params, order=order)


def check_invariants(ids, lp, tail, p, params, order="id"):
    _, (d_ids, d_lp, d_tail) = roundtrip(ids, lp, tail, params, order)
    n, k = ids.shape
    assert d_ids.shape == (n, k) and d_lp.shape == (n, k) and d_tail.shape == (n,)
    assert d_lp.dtype == np.float32 and d_tail.dtype == np.float32
    np.testing.assert_array_equal(np.sort(d_ids, 1), np.sort(ids, 1))  # the same id set per row
    if order == "id":
        assert (np.diff(d_ids.astype(np.int64), axis=1) > 0).all()
    else:
        assert (d_lp[:, 1:] <= d_lp[:, :-1]).all()
    q_sum = np.exp(d_lp.astype(np.float64)).sum(1) + np.exp(d_tail.astype(np.float64))
    np.testing.assert_allclose(q_sum, 1.0, atol=2e-6 * (k + 1) ** 0.5)
    assert (np.isneginf(d_tail) == (p[:, k] == 0)).all()  # zero mass decodes to -inf, and only zero mass
    # documented bound: ||sqrt(q) - sqrt(p)||_2 <= 1.1 step sqrt(k+1) per row (p from the float64 reference)
    kl = reference_kl(p, ids, d_ids, d_lp, d_tail)
    q = np.exp(np.concatenate([d_lp.astype(np.float64), d_tail[:, None].astype(np.float64)], 1))
    s = params["step"]
    if n:
        p_by_id = np.concatenate([np.take_along_axis(p[:, :k], np.argsort(ids, 1), 1), p[:, k:]], 1)
        q_by_id = np.concatenate([np.take_along_axis(q[:, :k], np.argsort(d_ids, 1), 1), q[:, k:]], 1)
        hell = np.sqrt(((np.sqrt(q_by_id) - np.sqrt(p_by_id)) ** 2).sum(1))
        assert hell.max() <= 1.1 * s * (k + 1) ** 0.5 + 1e-6
        assert kl.max() <= 0.6 * (k + 1) * s**2 + 1e-7  # every bucket at a bin edge gives about (k+1) s^2 / 2
    return kl, (d_ids, d_lp, d_tail)


# -- round trips on LM-shaped rows ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 16, 64, 128])
def test_mean_kl_near_prediction_and_below_target(k):
    rng = np.random.default_rng(k)
    ids, lp, tail, p = topk_rows(rng, 400, k, 49_152)
    params = tc.make_params(k, 49_152)
    kl, _ = check_invariants(ids, lp, tail, p, params)
    predicted = (k + 1) * params["step"] ** 2 / 6
    assert kl.mean() <= 1.15 * predicted and kl.mean() <= tc.DEFAULT_KL * 1.15
    if k >= 16:
        assert kl.mean() >= 0.5 * predicted  # the formula is the operating point, not a loose bound


@pytest.mark.parametrize("order", ["id", "rank"])
def test_rank_order_restores_most_likely_first(order):
    rng = np.random.default_rng(1)
    ids, lp, tail, p = topk_rows(rng, 200, 32, 49_152)
    _, (d_ids, d_lp, _) = check_invariants(ids, lp, tail, p, tc.make_params(32, 49_152), order)
    if order == "rank":
        # along the decoded order the teacher's sqrt(p) never rises by more than one grid step (a bin's width)
        step = tc.make_params(32, 49_152)["step"]
        u = {(i, int(t)): np.sqrt(np.exp(np.float64(lp[i, j]))) for i in range(len(ids)) for j, t in enumerate(ids[i])}
        u_dec = np.array([[u[i, int(t)] for t in row] for i, row in enumerate(d_ids)])
        assert np.diff(u_dec, axis=1).max() <= step * 1.001
        assert (d_ids[:, 0] == ids[:, 0]).mean() > 0.9  # the argmax is almost always clear


@pytest.mark.parametrize("vocab", [262_144, 2**24 + 3, 2**31 - 1, 2**40, 2**62 + 12345])
def test_any_vocabulary_size(vocab):
    rng = np.random.default_rng(vocab % 1000)
    ids, lp, tail, p = topk_rows(rng, 50, 16, vocab)
    ids[0, 0] = vocab - 1  # the largest id survives
    ids[0, 1] = 0 if ids[0, 1:].min() != 0 else ids[0, 1]
    params = tc.make_params(16, vocab)
    assert len([s for s in tc.stream_widths(params) if s.startswith("ids_")]) == -(-(vocab - 1).bit_length() // 8)
    _, (d_ids, _, _) = check_invariants(ids, lp, tail, p, params)
    assert d_ids.dtype == (np.int32 if vocab <= 2**31 else np.int64)
    assert d_ids.max() == vocab - 1


def test_sixteen_bit_boundaries_need_a_third_plane():
    ids = np.array([[0, 65_535, 65_536]])
    lp = np.log(np.array([[0.5, 0.25, 0.125]], np.float32))
    params = tc.make_params(3, 65_537)
    _, (d_ids, _, _) = roundtrip(ids, lp, np.log(np.float32([0.125])), params)
    np.testing.assert_array_equal(d_ids, [[0, 65_535, 65_536]])


def test_fine_grid_needs_three_value_planes():
    params = tc.make_params(4, 100, step=1e-6)  # codes up to 10**6: three value planes, nothing wraps
    assert [s for s in tc.stream_widths(params) if s.startswith("val_")] == ["val_b0", "val_b1", "val_b2"]
    ids = np.array([[3, 1, 2, 0], [0, 1, 2, 3]])
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([[1.0, 0, 0, 0], [0.97, 0.01, 0.01, 0.005]], np.float32))
        tail = np.log(np.float32([0.0, 0.005]))
    _, (d_ids, d_lp, d_tail) = roundtrip(ids, lp, tail, params, "rank")
    np.testing.assert_array_equal(d_ids[0, :1], [3])
    np.testing.assert_allclose(np.exp(d_lp[1]), [0.97, 0.01, 0.01, 0.005], rtol=1e-3)


# -- edge rows -------------------------------------------------------------------------------------------------------------

def test_edge_rows():
    k, V = 4, 10
    params = tc.make_params(k, V)
    ninf = -np.inf
    ids = np.array([[5, 2, 9, 0], [1, 2, 3, 4], [7, 8, 9, 6], [0, 1, 2, 3]])
    lp = np.array([
        [0.0, ninf, ninf, ninf],  # one token has all the mass, no tail
        np.log([0.25, 0.25, 0.25, 0.25]),  # four-way tie, tail 0
        [np.log(0.5), np.log(0.2), ninf, ninf],  # -inf inside the top-k
        np.log([0.1, 0.1, 0.05, 0.05]),  # most of the mass in the tail
    ], dtype=np.float32)
    tail = np.array([ninf, ninf, np.log(0.3), np.log(0.7)], np.float32)
    p = np.exp(np.concatenate([lp, tail[:, None]], 1).astype(np.float64))
    _, (d_ids, d_lp, d_tail) = check_invariants(ids, lp, tail, p / p.sum(1, keepdims=True), params, "rank")
    assert d_ids[0, 0] == 5 and abs(d_lp[0, 0]) < 1e-6 and np.isneginf(d_lp[0, 1:]).all() and np.isneginf(d_tail[0])
    np.testing.assert_allclose(np.exp(d_lp[1]), 0.25, rtol=1e-6)
    np.testing.assert_array_equal(d_ids[1], [1, 2, 3, 4])  # ties come back in id order
    assert np.isneginf(d_lp[2, 2:]).all() and set(d_ids[2, 2:]) == {6, 9} and list(d_ids[2, :2]) == [7, 8]


def test_k_equals_vocab_has_no_tail():
    rng = np.random.default_rng(2)
    ids, lp, tail, p = topk_rows(rng, 20, 8, 8, no_tail=True)
    kl, (_, _, d_tail) = check_invariants(ids, lp, tail, p, tc.make_params(8, 8))
    assert np.isneginf(d_tail).all()


def test_empty_example():
    params = tc.make_params(64, 49_152)
    streams, (d_ids, d_lp, d_tail) = roundtrip(np.zeros((0, 64), np.int32), np.zeros((0, 64), np.float32), np.zeros(0, np.float32), params)
    assert all(len(s) == 0 for s in streams.values())
    assert d_ids.shape == (0, 64) and d_lp.shape == (0, 64) and d_tail.shape == (0,)
    out = tc.encode_many(np.zeros((0, 64), np.int32), np.zeros((0, 64), np.float32), np.zeros(0, np.float32), [0, 0], params)
    assert all(list(off) == [0, 0, 0] for _, off in out.values())


@pytest.mark.parametrize("step", [None, 1e-4])
@pytest.mark.parametrize("above", [2e-7, 9e-4])
def test_slightly_positive_logprob_is_clipped_to_one(step, above):
    params = tc.make_params(2, 10, step=step)
    _, (_, d_lp, d_tail) = roundtrip(np.array([[1, 2]]), np.float32([[above, -np.inf]]), np.float32([-np.inf]), params)
    assert abs(d_lp[0, 0]) < 1e-6 and np.isneginf(d_lp[0, 1]) and np.isneginf(d_tail[0])


# -- bytes: deterministic, order-free, JSON params, many examples --------------------------------------------------------

def test_deterministic_and_independent_of_input_order():
    rng = np.random.default_rng(3)
    ids, lp, tail, _ = topk_rows(rng, 64, 32, 49_152, ties=0.2, zeros=0.1)
    params = tc.make_params(32, 49_152)
    a = tc.encode(ids, lp, tail, params)
    perm = np.stack([rng.permutation(32) for _ in range(64)])
    b = tc.encode(np.take_along_axis(ids, perm, 1), np.take_along_axis(lp, perm, 1), tail, json.loads(json.dumps(params)))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert {n: len(s) for n, s in a.items()} == {n: 64 * w for n, w in tc.stream_widths(params).items()}


def test_params_are_small_json_and_decode_needs_only_them():
    params = tc.make_params(64, 49_152, kl=2e-5)
    assert set(params) == {"codec", "version", "k", "vocab_size", "step"}
    assert json.loads(json.dumps(params)) == params
    assert params["step"] == pytest.approx((6 * 2e-5 / 65) ** 0.5)
    assert tc.make_params(64, 49_152, step=0.004)["step"] == 0.004


def test_encode_many_blobs_are_per_example_encodes_and_decode_many_joins_them():
    rng = np.random.default_rng(4)
    lengths = [5, 0, 17, 1]
    ids, lp, tail, p = topk_rows(rng, sum(lengths), 8, 1000)
    params = tc.make_params(8, 1000)
    many = tc.encode_many(ids, lp, tail, lengths, params)
    ends = np.cumsum([0] + lengths)
    blobs = {}
    for name, (data, offsets) in many.items():
        assert offsets.dtype == np.int64 and len(offsets) == len(lengths) + 1
        blobs[name] = [data[offsets[e] : offsets[e + 1]].tobytes() for e in range(len(lengths))]
        for e in range(len(lengths)):
            one = tc.encode(ids[ends[e] : ends[e + 1]], lp[ends[e] : ends[e + 1]], tail[ends[e] : ends[e + 1]], params)
            assert one[name].tobytes() == blobs[name][e]
    d_ids, d_lp, d_tail = tc.decode_many(blobs, lengths, params)
    np.testing.assert_array_equal(d_ids, np.sort(ids, 1))
    joined = tc.decode_many({n: d for n, (d, _) in many.items()}, lengths, params, order="rank")
    np.testing.assert_array_equal(np.sort(joined[0], 1), d_ids)
    with pytest.raises(ValueError, match="lengths"):
        tc.decode_many(blobs, [5, 0, 17], params)
    with pytest.raises(ValueError, match="lengths add up"):
        tc.encode_many(ids, lp, tail, [1, 2], params)


# -- refusals: bad input is refused with a clear error, never stored wrong ---------------------------------------------

@pytest.mark.parametrize("case, match", [
    ("id_too_big", r"\[0, 100\)"), ("negative_id", r"\[0, 100\)"), ("repeated_id", "repeats an id"),
    ("nan", "NaN"), ("positive", "<= 0"), ("no_mass", "no probability mass"), ("float_ids", "integers"),
    ("shape", r"\[N, 3\]"),
])
def test_bad_input_is_refused(case, match):
    params = tc.make_params(3, 100)
    ids, lp, tail = np.array([[1, 2, 3]]), np.log(np.float32([[0.5, 0.2, 0.1]])), np.log(np.float32([0.2]))
    if case == "id_too_big":
        ids[0, 1] = 100
    elif case == "negative_id":
        ids[0, 1] = -1
    elif case == "repeated_id":
        ids[0, 2] = 1
    elif case == "nan":
        lp[0, 1] = np.nan
    elif case == "positive":
        lp[0, 0] = 0.5
    elif case == "no_mass":
        lp[:], tail[:] = -np.inf, -np.inf
    elif case == "float_ids":
        ids = ids.astype(np.float64)
    elif case == "shape":
        lp = lp[:, :2]
    with pytest.raises(ValueError, match=match):
        tc.encode(ids, lp, tail, params)


def test_bad_params_and_streams_are_refused():
    with pytest.raises(ValueError, match="version"):
        tc.stream_widths({**tc.make_params(4, 10), "version": 99})
    with pytest.raises(ValueError, match="k <= vocab_size"):
        tc.make_params(11, 10)
    with pytest.raises(ValueError, match="step"):
        tc.make_params(4, 10, step=0.0)
    params = tc.make_params(2, 50_000)
    streams = tc.encode(np.array([[7, 49_999]]), np.log(np.float32([[0.6, 0.3]])), np.log(np.float32([0.1])), params)
    with pytest.raises(ValueError, match="missing streams"):
        tc.decode({"ids_b0": streams["ids_b0"]}, params)
    with pytest.raises(ValueError, match="expected"):
        tc.decode({**streams, "val_b0": streams["val_b0"][:-1]}, params)
    bad = {**streams, "ids_b1": np.full_like(streams["ids_b1"], 255)}  # gaps that run past the vocabulary
    with pytest.raises(ValueError, match="corrupt"):
        tc.decode(bad, params)
    bad = {**streams, "val_b0": np.full_like(streams["val_b0"], 255)}  # codes above the code of p = 1
    with pytest.raises(ValueError, match="corrupt"):
        tc.decode(bad, params)
    with pytest.raises(ValueError, match="order"):
        tc.decode(streams, params, order="desc")


# -- properties ----------------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 12),
    k=st.integers(1, 40),
    vocab_extra=st.sampled_from([0, 1, 7, 1000, 2**16, 2**24, 2**31 - 41, 2**45]),
    zeros=st.sampled_from([0.0, 0.3]),
    ties=st.sampled_from([0.0, 0.5]),
    no_tail=st.booleans(),
    kl=st.sampled_from([1e-5, 9e-5, 1e-3]),
    order=st.sampled_from(["id", "rank"]),
)
def test_roundtrip_properties(seed, n, k, vocab_extra, zeros, ties, no_tail, kl, order):
    rng = np.random.default_rng(seed)
    vocab = k + vocab_extra
    ids, lp, tail, p = topk_rows(rng, n, k, vocab, zeros=zeros, ties=ties, no_tail=no_tail or vocab == k)
    params = tc.make_params(k, vocab, kl=kl)
    check_invariants(ids, lp, tail, p, params, order)
    again = tc.encode(ids, lp, tail, params)
    assert all(np.array_equal(again[s], x) for s, x in tc.encode(ids, lp, tail, params).items())
