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


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_stores_hidden_states_a_reader_gets_back(tiny_teacher, text_jsonl, tmp_path, name):
    exact = run(tiny_teacher, tmp_path / "fp32", text_jsonl, top_k=4, hidden_layers=[1], hidden_codec="fp32", data={"max_rows": 4})
    coded = run(tiny_teacher, tmp_path / name, text_jsonl, top_k=4, hidden_layers=[1], hidden_codec=name, data={"max_rows": 4})
    bound = {"fp32": 0.0, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}[name]
    for a, b in zip(exact, coded):
        assert b["hidden_1"].dtype == np.float32 and b["hidden_1"].shape == a["hidden_1"].shape
        np.testing.assert_allclose(b["hidden_1"], a["hidden_1"], rtol=bound, atol=1e-6)
