"""Value codecs against an independent reference (torch's own casts, float64 arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from kdcache.cache.codecs import CODECS, get_codec
from test_generate import run

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, st.integers(0, 64), elements=finite32))
def test_bf16_is_torchs_bfloat16_cast_and_within_its_error(x):
    bf16 = get_codec("bf16")
    stored = bf16.encode(x)
    assert stored.dtype == np.uint16 and stored.shape == x.shape
    back = bf16.decode(stored)
    ref = torch.from_numpy(x.copy()).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(back, ref)
    bf16_max = float(torch.finfo(torch.bfloat16).max)  # above it (fp32's last 0.4%) both round to inf
    normal = (np.abs(x) >= np.finfo(np.float32).tiny * 2**8) & (np.abs(x) <= bf16_max)  # no subnormals, no overflow
    rel = np.abs(back[normal].astype(np.float64) - x[normal]) / np.abs(x[normal].astype(np.float64))
    assert (rel <= 2.0 ** -8 + 1e-12).all() and np.isfinite(back[np.abs(x) <= bf16_max]).all()


def test_bf16_keeps_outliers_that_fp16_turns_into_inf():
    x = np.array([7e4, -1.5e5, 3e38, 1e-3, 0.0], dtype=np.float32)
    assert np.isinf(get_codec("fp16").decode(get_codec("fp16").encode(x))[:2]).all()
    back = get_codec("bf16").decode(get_codec("bf16").encode(x))
    assert np.isfinite(back).all() and np.allclose(back, x, rtol=2.0 ** -8)


@st.composite
def token_rows(draw):
    """[N, D] float32 tokens of very different scales (1e-30 .. 1e30), with an all-zero token and outliers."""
    n, d = draw(st.integers(1, 12)), draw(st.integers(1, 80))
    base = draw(arrays(np.float64, (n, d), elements=st.floats(-1, 1, allow_nan=False)))
    exps = draw(arrays(np.int64, (n,), elements=st.integers(-30, 30)))
    x = base * 10.0 ** exps[:, None]
    if draw(st.booleans()):
        x[draw(st.integers(0, n - 1))] = 0.0  # an all-zero token
    if draw(st.booleans()):
        x[draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))] *= draw(st.floats(1e2, 1e6))  # one outlier channel
    return x.astype(np.float32)


@settings(max_examples=300, deadline=None)
@given(token_rows())
def test_int8_round_trip_error_is_half_a_step_of_its_tokens_scale(x):
    """Against float64: every value is within max|x|/254 of its token (half a quantisation step), the scale is
    max|x|/127, codes stay in [-127, 127], and an all-zero token decodes to zeros."""
    int8 = get_codec("int8")
    q, scale = int8.encode_rows(x)
    assert q.dtype == np.int8 and q.shape == x.shape and scale.dtype == np.float32 and scale.shape == (len(x),)
    assert q.min(initial=0) >= -127
    x64 = x.astype(np.float64)
    amax = np.abs(x64).max(axis=1)
    np.testing.assert_allclose(scale, amax / 127, rtol=1e-6, atol=1e-44)  # atol: float32 subnormal scales
    back = int8.decode_rows(q, scale)
    assert back.dtype == np.float32 and back.shape == x.shape
    err = np.abs(back.astype(np.float64) - x64)
    assert np.all(err <= (amax / 254 * (1 + 1e-5))[:, None] + 1e-40)
    zero = amax == 0
    assert np.all(back[zero] == 0) and np.all(q[zero] == 0)
    # The largest value of each nonzero token is stored exactly as +-127 steps.
    nz = ~zero & (amax > 1e-36)
    if nz.any():
        top = np.abs(x64[nz]).argmax(axis=1)
        assert np.all(np.abs(q[nz][np.arange(nz.sum()), top]) == 127)


def test_int8_has_no_scale_free_encode():
    with pytest.raises(TypeError, match="encode_rows"):
        get_codec("int8").encode(np.zeros(3, np.float32))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_stores_hidden_states_a_reader_gets_back(tiny_teacher, text_jsonl, tmp_path, name):
    exact = run(tiny_teacher, tmp_path / "fp32", text_jsonl, top_k=4, hidden_layers=[1], hidden_codec="fp32", data={"max_rows": 4})
    coded = run(tiny_teacher, tmp_path / name, text_jsonl, top_k=4, hidden_layers=[1], hidden_codec=name, data={"max_rows": 4})
    for a, b in zip(exact, coded):
        assert b["hidden_1"].dtype == np.float32 and b["hidden_1"].shape == a["hidden_1"].shape
        if name == "int8":  # per token: half a step of its scale
            bound = np.abs(a["hidden_1"].astype(np.float64)).max(-1, keepdims=True) / 254 * (1 + 1e-5)
            assert np.all(np.abs(b["hidden_1"] - a["hidden_1"].astype(np.float64)) <= bound)
        else:
            bound = {"fp32": 0.0, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}[name]
            np.testing.assert_allclose(b["hidden_1"], a["hidden_1"], rtol=bound, atol=1e-6)
