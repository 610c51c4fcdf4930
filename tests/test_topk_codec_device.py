"""Top-k codes decoded on the device (kdcache/cache/topk_codec_device.py) and the trainer path that ships them there.

References: the numpy decoder (tests/test_topk_codec.py checks it against float64 distributions), the float64 rows the
codes were made from (the documented error bound), and a training run that decodes on the host.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.cache import open_cache, topk_codec as tc, topk_codec_device
from kdcache.cache.topk_storage import storage_of
from kdcache.train import train
from kdcache.train.data import EVAL_SIGNALS, batches, collate, topk_decoder, train_columns
from test_generate import run
from test_topk_codec import reference_kl, topk_rows
from test_train import final_weights, make_cfg, max_diff


def device_decode(streams: dict, params: dict):
    widths = tc.stream_widths(params)
    n = len(streams["ids_b0"]) // params["k"]
    tensors = {s: torch.from_numpy(np.asarray(streams[s]).reshape(n, w).copy()) for s, w in widths.items()}
    ids, lp, tail = topk_codec_device.decode(tensors, params)
    return ids.numpy(), lp.numpy(), tail.numpy()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1), n=st.integers(0, 12), k=st.integers(1, 40),
    vocab_extra=st.sampled_from([0, 1, 7, 1000, 2**16, 2**24, 2**31 - 41, 2**40]),
    zeros=st.sampled_from([0.0, 0.3]), no_tail=st.booleans(), kl=st.sampled_from([1e-5, 9e-5, 1e-3]),
)
def test_device_decode_equals_the_numpy_decoder(seed, n, k, vocab_extra, zeros, no_tail, kl):
    rng = np.random.default_rng(seed)
    vocab = k + vocab_extra
    ids, lp, tail, p = topk_rows(rng, n, k, vocab, zeros=zeros, no_tail=no_tail or vocab == k)
    params = tc.make_params(k, vocab, kl=kl)
    streams = tc.encode(ids, lp, tail, params)
    ref_ids, ref_lp, ref_tail = tc.decode(streams, params, order="id")
    d_ids, d_lp, d_tail = device_decode(streams, params)
    np.testing.assert_array_equal(d_ids, ref_ids.astype(np.int64))
    assert d_lp.dtype == np.float32 and d_tail.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(d_lp), np.isneginf(ref_lp))
    np.testing.assert_allclose(d_lp, ref_lp, atol=2e-6, rtol=0)
    np.testing.assert_allclose(d_tail, ref_tail, atol=2e-6, rtol=0)
    if n:  # and against the float64 rows the codes came from: the codec's documented KL bound holds
        assert reference_kl(p, ids, d_ids, d_lp, d_tail).max() <= 0.6 * (k + 1) * params["step"] ** 2 + 1e-7


def test_corrupt_codes_are_refused_on_the_device():
    rng = np.random.default_rng(0)
    ids, lp, tail, _ = topk_rows(rng, 6, 8, 1000)
    params = tc.make_params(8, 1000)
    streams = tc.encode(ids, lp, tail, params)
    vals = [s for s in streams if s.startswith("val_")]
    for bad, what in [({"ids_b0": np.full_like(streams["ids_b0"], 255)}, "vocabulary"),
                      ({vals[-1]: np.full_like(streams[vals[-1]], 255)}, "exceeds"),
                      ({v: np.zeros_like(streams[v]) for v in vals}, "no probability mass")]:
        with pytest.raises(ValueError, match=what):
            device_decode({**streams, **bad}, params)
    with pytest.raises(ValueError, match="missing streams"):
        topk_codec_device.decode({}, params)


@pytest.fixture(scope="module")
def coded_cache(tiny_teacher, text_jsonl, tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    run(tiny_teacher, root / "coded", text_jsonl, top_k=16, codec="sqrt-delta", data={"max_rows": 32})
    return root / "coded"


def test_reader_hands_out_the_codes_that_decode_to_its_own_examples(coded_cache):
    cache = open_cache(coded_cache, topk_order="any")
    assert cache.topk_code_columns and all(c.startswith("topk.") for c in cache.topk_code_columns)
    decoded = list(cache.stream(columns=train_columns(cache, EVAL_SIGNALS)))
    codes = list(cache.stream(columns=train_columns(cache, EVAL_SIGNALS, topk_codes=True)))
    storage, params = storage_of(cache.manifest.signals)
    assert len(decoded) == len(codes) > 0
    for a, b in zip(decoded, codes):
        assert "topk_ids" not in b and a["example_id"] == b["example_id"]
        streams = {c: torch.from_numpy(np.ascontiguousarray(b[c])) for c in cache.topk_code_columns}
        assert all(s.dtype == torch.uint8 and s.shape[0] == len(a["tail_logprob"]) for s in streams.values())
        ids, lp, tail = storage.decode_tensors(streams, params)
        np.testing.assert_array_equal(ids.numpy(), a["topk_ids"])
        np.testing.assert_allclose(lp.numpy(), a["topk_logprobs"], atol=2e-6, rtol=0)
        np.testing.assert_allclose(tail.numpy(), a["tail_logprob"], atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        cache.stream(columns=["topk_ids", *cache.topk_code_columns])


def test_batches_of_codes_decode_in_to_as_the_host_batches(coded_cache):
    cache = open_cache(coded_cache, topk_order="any", keep_float16=True)
    host = list(batches(cache.stream(columns=train_columns(cache, EVAL_SIGNALS)), 4))
    stream = cache.stream(columns=train_columns(cache, EVAL_SIGNALS, topk_codes=True))
    coded = list(batches(stream, 4, collate_fn=lambda ex, pad, tail: collate(ex, pad, tail, topk_decoder(cache))))
    for h, c in zip(host, coded):
        assert c.targets.topk_ids is None and c.topk_codes is not None
        h, c = h.to(torch.device("cpu")), c.to(torch.device("cpu"))
        assert torch.equal(h.targets.topk_ids, c.targets.topk_ids) and c.targets.topk_ids.dtype == torch.int64
        torch.testing.assert_close(c.targets.topk_logprobs, h.targets.topk_logprobs, atol=2e-6, rtol=0)
        torch.testing.assert_close(c.targets.tail_logprob, h.targets.tail_logprob, atol=2e-6, rtol=0)
        assert torch.equal(h.targets.labels, c.targets.labels) and h.num_tokens == c.num_tokens
    with pytest.raises(ValueError, match="topk_decode"):
        collate(list(cache.stream(columns=train_columns(cache, EVAL_SIGNALS, topk_codes=True)))[:2])


@pytest.mark.parametrize("packing", [False, True])
def test_training_with_device_decode_equals_host_decode(coded_cache, tmp_path, packing, monkeypatch):
    """The same run, the top-k decoded in the reader or after the copy: float32 rounding apart, the same student."""
    calls = []
    real = topk_codec_device.decode
    monkeypatch.setattr(topk_codec_device, "decode", lambda *a: calls.append(1) or real(*a))  # counts, decodes for real
    runs = {}
    for where in ("host", "device"):
        cfg = make_cfg(coded_cache, tmp_path / where, steps=8, batch_size=4, temperature=2.0, topk_decode=where, packing=packing)
        runs[where] = (cfg, train(cfg, progress=False))
        assert (len(calls) >= 8) == (where == "device"), (where, len(calls))  # one decode per micro-batch on the device path
    assert max_diff(final_weights(tmp_path / "host"), final_weights(tmp_path / "device")) < 1e-5
    assert runs["host"][1]["eval_kd"] == pytest.approx(runs["device"][1]["eval_kd"], rel=1e-5)
