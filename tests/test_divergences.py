"""The divergence family: each equals its dense definition when k equals the vocabulary, its gradient
equals autograd through a naive full-softmax implementation, and chunking changes nothing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdcache.errors import ConfigError
from kdcache.train.config import TrainConfig
from kdcache.train.divergences import DIVERGENCES, JSDConfig, SkewConfig, bucket_log_probs, dense_divergence, gather_log_probs
from kdcache.train.losses import LossSettings, Targets, VirtualTeacherConfig, get_loss, loss_options

NAMES = sorted(DIVERGENCES)


def _case(n=12, V=40, k=None, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    teacher = scale * torch.randn(n, V, generator=g, dtype=torch.float64)
    student = scale * torch.randn(n, V, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(teacher, -1)
    k = V if k is None else k
    vals, ids = logp.topk(k, -1)
    tail = torch.logsumexp(logp.scatter(-1, ids, -math.inf), -1) if k < V else torch.full((n,), -math.inf, dtype=torch.float64)
    labels = torch.randint(0, V, (n,), generator=g)
    return teacher, student, Targets(labels, ids, vals, tail)


def _dense_definition(name, teacher_logits, student_logits, tau, p):
    """tau^2 * divergence summed over tokens, written here from the conventions in divergences.py's docstring
    on full float64 probabilities (not through the module's divergence functions)."""
    T = torch.softmax(teacher_logits.double() / tau, -1)
    S = torch.softmax(student_logits.double() / tau, -1)

    def kl(a, b):  # all entries of a dense softmax are > 0 here
        return (a * (a.log() - b.log())).sum(-1)

    if name == "fkl":
        d = kl(T, S)
    elif name == "rkl":
        d = kl(S, T)
    elif name == "jsd":
        M = p.beta * T + (1 - p.beta) * S
        d = p.beta * kl(T, M) + (1 - p.beta) * kl(S, M)
    elif name == "skl":
        d = kl(T, p.skew * T + (1 - p.skew) * S)
    elif name == "srkl":
        d = kl(S, (1 - p.skew) * T + p.skew * S)
    elif name == "tv":
        d = 0.5 * (T - S).abs().sum(-1)
    else:
        raise AssertionError(f"no reference for divergence {name!r}: add one here")
    return d.sum() * tau**2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_full_vocab_equals_dense_value_and_gradient(name, tau, tail):
    teacher, student, tg = _case()
    p = SimpleNamespace(beta=0.3, skew=0.2)
    settings = LossSettings(temperature=tau, alpha=1.0, tail=tail,
                            options={"jsd": JSDConfig(beta=p.beta), "skl": SkewConfig(skew=p.skew), "srkl": SkewConfig(skew=p.skew)})
    z = student.clone().requires_grad_(True)
    loss, metrics = get_loss(name).fn(z, tg, settings)
    loss.backward()
    z_ref = student.clone().requires_grad_(True)
    ref = _dense_definition(name, teacher, z_ref, tau, p)
    ref.backward()
    # float64 on both sides (the logits are float64): agreement to ~1e-12 relative; 1e-6 / 1e-5 leave room for
    # the log/exp round trips of the bucket path and are far below any formula error (O(1) relative).
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-8), (loss.item(), ref.item())
    assert torch.allclose(z.grad, z_ref.grad, rtol=1e-5, atol=1e-8)
    assert torch.allclose(metrics[name], ref)
    # the library's dense helper (used by other checks) agrees with the definitions too
    assert torch.allclose(dense_divergence(name, teacher, student, tau, p), ref.detach(), rtol=1e-9)


def _dense_tempered_tail(teacher_logits, ids, tau):
    """log of the teacher's mass outside ``ids`` under softmax(logits / tau), on the full float64 distribution."""
    return torch.logsumexp(torch.log_softmax(teacher_logits / tau, -1).scatter(-1, ids, -math.inf), -1)


def _naive_buckets(z, tg, tau, tail, tail_t=None):
    """Bucket log-probs through a full log_softmax with plain autograd (no chunking, no custom backward).
    With ``tail_t`` (the teacher's exact tail at tau): the tempered full softmax of each side, bucketed.
    Without: each side's temperature-1 buckets, tempered as k+1 tokens."""
    if tail == "renormalize":
        return torch.log_softmax(tg.topk_logprobs / tau, -1), torch.log_softmax(z.gather(1, tg.topk_ids) / tau, -1)
    if tail_t is not None:
        s = torch.log_softmax(z / tau, -1)
        q = torch.softmax(tg.topk_logprobs / tau, -1) * (1 - tail_t.exp())[:, None]
        t = torch.cat([q.log(), tail_t[:, None]], -1)
        return t, torch.cat([s.gather(1, tg.topk_ids), torch.logsumexp(s.scatter(-1, tg.topk_ids, -math.inf), -1)[:, None]], -1)
    s = torch.log_softmax(z, -1)
    b = torch.cat([s.gather(1, tg.topk_ids), torch.logsumexp(s.scatter(-1, tg.topk_ids, -math.inf), -1)[:, None]], -1)
    t = torch.cat([tg.topk_logprobs, tg.tail_logprob[:, None]], -1)
    return torch.log_softmax(t / tau, -1), torch.log_softmax(b / tau, -1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("exact", [False, True])
def test_sparse_gradient_matches_naive_autograd(name, tail, exact):
    teacher, student, tg = _case(k=6, seed=1)
    p = SimpleNamespace(beta=0.7, skew=0.3)
    for tau in (0.5, 1.0, 3.0):
        tail_t = _dense_tempered_tail(teacher, tg.topk_ids, tau) if exact and tau != 1.0 else None
        z1 = student.clone().requires_grad_(True)
        t1, s1 = bucket_log_probs(z1, tg.topk_ids, tg.topk_logprobs, tg.tail_logprob, tau, tail, tail_t, chunk_rows=5)
        (DIVERGENCES[name][0](t1, s1, p).sum()).backward()
        z2 = student.clone().requires_grad_(True)
        t2, s2 = _naive_buckets(z2, tg, tau, tail, tail_t)
        (DIVERGENCES[name][0](t2, s2, p).sum()).backward()
        assert torch.allclose(t1, t2, rtol=1e-9, atol=1e-12), name
        assert torch.allclose(z1.grad, z2.grad, rtol=1e-6, atol=1e-9), name


def test_gather_log_probs_gradcheck_and_chunk_invariance():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(7, 11, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 11, (7, 4), generator=g)
    assert torch.autograd.gradcheck(lambda x: gather_log_probs(x, ids, 1.7, 3), (z,))
    a = gather_log_probs(z, ids, 2.0, chunk_rows=1)
    b = gather_log_probs(z, ids, 2.0, chunk_rows=64)
    assert torch.equal(a, b)


def test_properties_of_the_divergences():
    teacher, student, tg = _case(k=8, seed=4)
    settings = LossSettings(alpha=1.0)  # every loss at its defaults (beta 0.5, skew 0.1)
    # Zero when the student equals the teacher (on full distributions), positive otherwise.
    _, _, tg_full = _case(seed=4)
    for name in NAMES:
        same, _ = get_loss(name).fn(teacher.clone(), tg_full, settings)
        diff, _ = get_loss(name).fn(student.clone(), tg, settings)
        assert abs(same.item()) < 1e-9 and diff.item() > 0, name
    # TV is bounded by 1 per token; JSD by log 2.
    n = tg.labels.numel()
    assert get_loss("tv").fn(student, tg, settings)[0].item() <= n
    assert get_loss("jsd").fn(student, tg, settings)[0].item() <= n * math.log(2)


def _value_and_grad(fn, z):
    z = z.detach().clone().requires_grad_(True)
    out, metrics = fn(z)
    out.backward()
    return out.detach(), z.grad, metrics


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_alpha_mixes_hard_labels(tau):
    """The hard-label term shares the divergence's pass over the vocabulary at T=1; value and gradient must
    still be exactly alpha * KD + (1 - alpha) * CE (CE at T=1 whatever the KD temperature)."""
    _, student, tg = _case(k=8, seed=5)
    ce_fn = lambda z: (torch.nn.functional.cross_entropy(z, tg.labels, reduction="sum"), {})  # noqa: E731
    ce, g_ce, _ = _value_and_grad(ce_fn, student)
    sampled = Targets(tg.labels, sampled_ids=tg.topk_ids[:, :5], sampled_weights=torch.rand(tg.topk_ids.shape[0], 5))
    cases = [(name, tg) for name in NAMES] + ([("rskd", sampled)] if tau == 1.0 else [])
    for name, targets in cases:
        fn = get_loss(name).fn
        kd, g_kd, _ = _value_and_grad(lambda z: fn(z, targets, LossSettings(alpha=1.0, temperature=tau)), student)
        mixed, g_mixed, m2 = _value_and_grad(lambda z: fn(z, targets, LossSettings(alpha=0.25, temperature=tau)), student)
        assert torch.allclose(mixed, 0.25 * kd + 0.75 * ce) and torch.allclose(m2["ce"], ce), name
        torch.testing.assert_close(g_mixed, 0.25 * g_kd + 0.75 * g_ce, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_settings_and_names():
    with pytest.raises(ConfigError, match="losses.jsd.beta must be in"):
        loss_options(TrainConfig(loss="jsd", losses={"jsd": {"beta": 1.5}}))
    with pytest.raises(ConfigError, match="valid losses: .*fkl.*jsd.*rkl.*skl.*srkl.*tv"):
        get_loss("kl-divergence")
    with pytest.raises(ConfigError, match="needs the cache's topk signal"):
        get_loss("rkl").fn(torch.zeros(2, 5), Targets(torch.zeros(2, dtype=torch.long)), LossSettings())


@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_virtual_teacher_equals_dense_reference(tau, alpha):
    _, student, tg = _case(n=9, V=23, seed=6)
    settings = LossSettings(temperature=tau, alpha=alpha, options={"tfkd": VirtualTeacherConfig(correct_prob=0.8)})
    z = student.clone().requires_grad_(True)
    loss, metrics = get_loss("tfkd").fn(z, tg, settings)
    loss.backward()
    V = student.shape[1]
    u = torch.full((9, V), 0.2 / (V - 1), dtype=torch.float64).scatter_(1, tg.labels[:, None], 0.8)
    zr = student.clone().requires_grad_(True)
    t = torch.log_softmax(u.log() / tau, -1)
    s = torch.log_softmax(zr / tau, -1)
    ref = alpha * (t.exp() * (t - s)).sum() * tau**2 + (1 - alpha) * torch.nn.functional.cross_entropy(zr, tg.labels, reduction="sum")
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-6) and torch.allclose(z.grad, zr.grad, rtol=1e-5, atol=1e-9)
    assert get_loss("tfkd").needs == ()  # no teacher signal at all
