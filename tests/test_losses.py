"""Tests of kdcache.train.losses: the fused sparse KD loss and its hand-written backward.

Every check compares against an explicit reference written here in float64 (softmax, bucket sums, KL)
and differentiated by autograd, never against the module's own helpers alone. The implementation works
in float32 internally, so tolerances are float32-sized (~1e-5 relative).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.errors import ConfigError
from kdcache.train.losses import (
    LOSSES,
    LossSettings,
    Targets,
    cross_entropy_loss,
    dense_reference_kd,
    get_loss,
    register_loss,
    sparse_kd_loss,
    teacher_buckets,
)

TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
TAILS = ("bucket", "renormalize")


# --------------------------------------------------------------------------------------------------
# Problem generation and explicit references


def make_problem(seed: int, N: int = 6, V: int = 40, k: int = 8, sharp: float = 3.0):
    """Random teacher distribution cached as top-k + tail log-mass (float32, as the cache stores it),
    student logits (float64 leaf), hard labels."""
    g = torch.Generator().manual_seed(seed)
    teacher_lp = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * sharp, dim=-1)
    topk_lp, topk_ids = teacher_lp.topk(k, dim=-1)
    if k < V:
        tail = torch.logsumexp(teacher_lp.scatter(1, topk_ids, float("-inf")), dim=-1)
    else:
        tail = torch.full((N,), float("-inf"), dtype=torch.float64)
    student = torch.randn(N, V, generator=g, dtype=torch.float64) * 2.0
    labels = torch.randint(0, V, (N,), generator=g)
    targets = Targets(labels, topk_ids, topk_lp.float(), tail.float())
    return teacher_lp, targets, student


def topk_mask(ids: torch.Tensor, V: int) -> torch.Tensor:
    return torch.zeros(ids.shape[0], V, dtype=torch.bool).scatter(1, ids, True)


def kl(q: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """sum q (log q - log p) with 0 log 0 = 0, per row."""
    safe_q = torch.where(q > 0, q, torch.ones_like(q))
    return torch.where(q > 0, q * (safe_q.log() - logp), torch.zeros_like(q)).sum(-1)


def ref_bucket_kd(z: torch.Tensor, t: Targets, T: float) -> torch.Tensor:
    """T^2 * KL over k+1 buckets (teacher top-k + tail bucket) with no stored tempered tail: both sides'
    temperature-1 buckets (the student's full softmax summed into them) tempered as k+1 tokens."""
    q = torch.softmax(torch.cat([t.topk_logprobs.double(), t.tail_logprob.double()[:, None]], dim=-1) / T, dim=-1)
    p = torch.softmax(z.double(), dim=-1)
    p_rest = p.masked_fill(topk_mask(t.topk_ids, z.shape[1]), 0.0).sum(-1)  # student mass outside the top-k
    p_buckets = torch.softmax(torch.cat([p.gather(1, t.topk_ids), p_rest[:, None]], dim=-1).log() / T, dim=-1)
    return kl(q, p_buckets.log()).sum() * T**2


def ref_renorm_kd(z: torch.Tensor, t: Targets, T: float) -> torch.Tensor:
    """T^2 * KL between teacher and student distributions both renormalised over the teacher's top-k."""
    q = torch.softmax(t.topk_logprobs.double() / T, dim=-1)
    p_top = torch.softmax(z.double() / T, dim=-1).gather(1, t.topk_ids)
    p_top = p_top / p_top.sum(-1, keepdim=True)
    return kl(q, p_top.log()).sum() * T**2


def ref_dense_kd(z: torch.Tensor, teacher_lp: torch.Tensor, T: float) -> torch.Tensor:
    q = torch.softmax(teacher_lp / T, dim=-1)
    logp = torch.log_softmax(z.double() / T, dim=-1)
    return kl(q, logp).sum() * T**2


def ref_kd(z, t, T, tail):
    return ref_bucket_kd(z, t, T) if tail == "bucket" else ref_renorm_kd(z, t, T)


def ref_ce(z, labels):
    return F.cross_entropy(z.double(), labels, reduction="sum")


def run_loss(z0: torch.Tensor, targets: Targets, settings: LossSettings, upstream: float = 1.7):
    """(total, metrics, dL/dz) of the implementation; the upstream factor checks the backward scales by it."""
    z = z0.detach().clone().requires_grad_()
    total, metrics = sparse_kd_loss(z, targets, settings)
    (total * upstream).backward()
    return total.detach(), metrics, z.grad / upstream


def ref_grad(fn, z0: torch.Tensor) -> torch.Tensor:
    z = z0.detach().double().clone().requires_grad_()
    fn(z).backward()
    return z.grad


def assert_close(got, want, rtol=1e-5, what=""):
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    scale = want.abs().max().clamp_min(1e-12)
    err = (got - want).abs().max()
    assert err <= rtol * scale, f"{what}: max abs error {err.item():.3g} vs scale {scale.item():.3g}"


# --------------------------------------------------------------------------------------------------
# k == V: the sparse loss is dense KD


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_full_vocab_equals_dense_kd(T, tail):
    V = 40
    teacher_lp, targets, z0 = make_problem(seed=int(T * 10), V=V, k=V)
    assert torch.isinf(targets.tail_logprob).all()
    total, metrics, grad = run_loss(z0, targets, LossSettings(temperature=T, alpha=1.0, tail=tail))

    want = ref_dense_kd(z0, teacher_lp, T)
    # an independent formulation through torch's own KL
    torch_kl = F.kl_div(torch.log_softmax(z0 / T, -1), torch.log_softmax(teacher_lp / T, -1), reduction="sum", log_target=True) * T**2
    assert_close(want, torch_kl, 1e-10, "reference vs F.kl_div")
    assert_close(total, want, what="loss vs explicit dense KL")
    assert_close(metrics["kd"], want, what="kd metric")
    assert_close(dense_reference_kd(z0, teacher_lp, T), want, what="dense_reference_kd")
    assert_close(grad, ref_grad(lambda z: ref_dense_kd(z, teacher_lp, T), z0), what="gradient")


def test_metric_is_t_squared_times_kl():
    """The kd metric is T^2 * KL(softmax(t/T) || softmax(s/T)), not KL alone."""
    V = 30
    teacher_lp, targets, z0 = make_problem(seed=3, V=V, k=V)
    for T in (1.0, 2.0, 3.0, 8.0):
        _, metrics, _ = run_loss(z0, targets, LossSettings(temperature=T, alpha=1.0))
        q = torch.softmax(teacher_lp / T, -1)
        plain_kl = (q * (q.log() - torch.log_softmax(z0 / T, -1))).sum()
        assert_close(metrics["kd"], T**2 * plain_kl, what=f"T={T}")
        if T != 1.0:
            assert abs(metrics["kd"].item() - plain_kl.item()) > 0.1 * plain_kl.item()


def test_gradient_scale_does_not_vanish_with_temperature():
    """Thanks to T^2, |dL/dz| stays O(1) as T grows; unscaled KL's gradient would fall like 1/T^2."""
    V = 40
    _, targets, z0 = make_problem(seed=4, V=V, k=V)
    norms = {}
    for T in (1.0, 2.0, 4.0, 8.0, 16.0):
        _, _, grad = run_loss(z0, targets, LossSettings(temperature=T, alpha=1.0))
        norms[T] = grad.norm().item()
    assert all(math.isfinite(n) and n > 0 for n in norms.values())
    for T, n in norms.items():
        assert 0.25 < n / norms[1.0] < 4.0, norms
    # the check is sensitive: the unscaled gradient at T=16 is 256x smaller
    assert norms[16.0] / 16.0**2 < 0.05 * norms[1.0]


# --------------------------------------------------------------------------------------------------
# k < V: teacher buckets, tail bucket and renormalisation


def dense_buckets(teacher_lp: torch.Tensor, topk_ids: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, densely in float64: temper the teacher's FULL distribution, softmax(logp / T) over the
    vocabulary, then sum it into the buckets (each top-k token; everything else into the tail)."""
    q = torch.softmax(teacher_lp.double() / T, dim=-1)
    return q.gather(1, topk_ids), q.masked_fill(topk_mask(topk_ids, q.shape[1]), 0.0).sum(-1)


def cached_from_dense(teacher_lp: torch.Tensor, k: int) -> Targets:
    """What the cache stores for a dense teacher: top-k log-probs and the tail's log-mass (float32)."""
    topk_lp, topk_ids = teacher_lp.topk(k, dim=-1)
    tail = torch.logsumexp(teacher_lp.scatter(1, topk_ids, float("-inf")), dim=-1)
    return Targets(torch.zeros(teacher_lp.shape[0], dtype=torch.long), topk_ids, topk_lp.float(), tail.float())


def one_token_tail_teacher(seed: int, N: int = 6, V: int = 40, k: int = 8, sharp: float = 3.0) -> torch.Tensor:
    """A dense teacher whose mass outside its top-k sits on ONE token: there, tempering the k+1 buckets (the
    documented rule when no tempered tail is stored) is exactly tempering the full distribution, at any T."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * sharp
    keep = logits.topk(k + 1, dim=-1).indices  # the top-k and the single tail token
    logits = torch.full_like(logits, float("-inf")).scatter(1, keep, logits.gather(1, keep))
    # rounded to float32 first, so the reference sees the very log-probs the cache holds
    return torch.log_softmax(logits, dim=-1).float().double()


# Tolerance 1e-6 on probabilities (all <= 1): teacher_buckets is a float32 softmax over k+1 = 9 buckets of
# float32 inputs; exp (~1 ulp), a 9-term sum (<= 8 roundings) and a division give a relative error of at most
# ~11 * eps32 / 2 = 7e-7 of each probability, independent of summation order or SIMD width. The float32
# rounding of the cached inputs is shared with the references (they are built from the rounded values), except
# the tail log-mass, rounded once: relative error 2^-24 * |log q_tail| / T, below 1e-7 here.


@pytest.mark.parametrize("T", TEMPERATURES)
def test_teacher_buckets(T):
    # Bucket tempering against the dense definition, on a teacher where the two coincide at every T.
    teacher_lp = one_token_tail_teacher(seed=5)
    t = cached_from_dense(teacher_lp, 8)
    assert (t.tail_logprob.exp() > 1e-4).all()  # the tail bucket carries mass: the check has teeth
    q, q_tail = teacher_buckets(t.topk_logprobs, t.tail_logprob, T, "bucket")
    want, want_tail = dense_buckets(teacher_lp, t.topk_ids, T)
    assert torch.allclose(q.double(), want, rtol=0, atol=1e-6) and torch.allclose(q_tail.double(), want_tail, rtol=0, atol=1e-6)
    assert (q >= 0).all() and (q_tail >= 0).all()

    # A general teacher (tail spread over 32 tokens). At T = 1 the cached log-probs ARE the dense buckets; at any
    # T the top-k keep the dense tempered teacher's ratios, and the buckets sum to one. (The tail bucket at T != 1
    # is exact only with a stored tempered tail mass; without it the k+1 buckets are tempered, as above.)
    teacher_lp = torch.log_softmax(torch.randn(6, 40, generator=torch.Generator().manual_seed(15), dtype=torch.float64) * 3.0, -1)
    teacher_lp = teacher_lp.float().double()
    t = cached_from_dense(teacher_lp, 8)
    q, q_tail = teacher_buckets(t.topk_logprobs, t.tail_logprob, T, "bucket")
    want, want_tail = dense_buckets(teacher_lp, t.topk_ids, T)
    assert torch.allclose(q.sum(-1) + q_tail, torch.ones(q.shape[0]), atol=1e-6)
    ratio = q.double() / q.double().sum(-1, keepdim=True)
    assert torch.allclose(ratio, want / want.sum(-1, keepdim=True), rtol=0, atol=1e-6)
    if T == 1.0:
        assert torch.allclose(q.double(), want, rtol=0, atol=1e-6) and torch.allclose(q_tail.double(), want_tail, rtol=0, atol=1e-6)

    # renormalize: the dense tempered teacher restricted to the top-k and renormalised, exact at every T.
    qr, qr_tail = teacher_buckets(t.topk_logprobs, t.tail_logprob, T, "renormalize")
    assert (qr_tail == 0).all()
    assert torch.allclose(qr.double(), want / want.sum(-1, keepdim=True), rtol=0, atol=1e-6)


def test_teacher_buckets_with_empty_tail():
    _, t, _ = make_problem(seed=6)
    tail = torch.full_like(t.tail_logprob, float("-inf"))
    q, q_tail = teacher_buckets(t.topk_logprobs, tail, 2.0, "bucket")
    assert (q_tail == 0).all() and torch.isfinite(q).all()
    assert torch.allclose(q.sum(-1), torch.ones(q.shape[0]), atol=1e-6)


@pytest.mark.parametrize("alpha", (1.0, 0.3, 0.0))
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("T", TEMPERATURES)  # T=1 takes the fused CE path, the others the separate one
def test_sparse_loss_matches_explicit_reference(T, tail, alpha):
    _, t, z0 = make_problem(seed=7 + int(4 * T))
    total, metrics, grad = run_loss(z0, t, LossSettings(temperature=T, alpha=alpha, tail=tail))

    kd_want = ref_kd(z0, t, T, tail)
    ce_want = ref_ce(z0, t.labels)
    assert_close(metrics["kd"], kd_want, what="kd metric")
    if alpha < 1.0:
        assert_close(metrics["ce"], ce_want, what="ce metric")
    else:
        assert "ce" not in metrics
    assert_close(total, alpha * kd_want + (1 - alpha) * ce_want, what="total")
    want_grad = ref_grad(lambda z: alpha * ref_kd(z, t, T, tail) + (1 - alpha) * ref_ce(z, t.labels), z0)
    assert_close(grad, want_grad, what="gradient")


def test_bucket_and_renormalize_differ():
    """Guards the two references above against being the same function."""
    _, t, z0 = make_problem(seed=8)
    b = run_loss(z0, t, LossSettings(1.0, 1.0, "bucket"))[0]
    r = run_loss(z0, t, LossSettings(1.0, 1.0, "renormalize"))[0]
    assert abs(b.item() - r.item()) > 1e-3 * abs(b.item())


def test_float32_logits():
    """The trainer feeds float32 (or bf16) logits; the gradient comes back in the logits' dtype."""
    _, t, z0 = make_problem(seed=9)
    z32 = z0.float()
    for T in (1.0, 2.0):
        total, _, grad = run_loss(z32, t, LossSettings(T, 0.5, "bucket"))
        assert grad.dtype == torch.float32
        assert_close(total, 0.5 * ref_bucket_kd(z32, t, T) + 0.5 * ref_ce(z32, t.labels), what="loss")
        assert_close(grad, ref_grad(lambda z: 0.5 * ref_bucket_kd(z, t, T) + 0.5 * ref_ce(z, t.labels), z32), what="grad")


@pytest.mark.parametrize("tail", TAILS)
def test_teacher_tail_minus_inf(tail):
    """A teacher with no mass outside its top-k (tail = -inf) gives a finite loss equal to the reference."""
    _, t, z0 = make_problem(seed=10)
    lp = torch.log_softmax(t.topk_logprobs.double(), -1).float()  # renormalise so the top-k hold all the mass
    t = Targets(t.labels, t.topk_ids, lp, torch.full_like(t.tail_logprob, float("-inf")))
    for T in (1.0, 2.0):
        total, metrics, grad = run_loss(z0, t, LossSettings(T, 0.5, tail))
        assert torch.isfinite(total) and torch.isfinite(grad).all()
        kd_want = ref_kd(z0, t, T, tail)
        assert torch.isfinite(kd_want)
        assert_close(metrics["kd"], kd_want, what="kd")
        assert_close(grad, ref_grad(lambda z: 0.5 * ref_kd(z, t, T, tail) + 0.5 * ref_ce(z, t.labels), z0), what="grad")


@pytest.mark.parametrize("boost", (12.0, 20.0, 40.0))
def test_finite_when_student_puts_all_mass_on_top_k(boost):
    """Student tail mass r -> 0 while the teacher keeps tail mass: loss and gradient stay finite, and the
    gradient still points where the exact (float64) gradient points."""
    _, t, z0 = make_problem(seed=11)
    z = z0.scatter_add(1, t.topk_ids, torch.full(t.topk_ids.shape, boost, dtype=torch.float64)).float()
    r = 1 - torch.softmax(z.double(), -1).gather(1, t.topk_ids).sum(-1)
    assert r.max() < 1e-3
    assert t.tail_logprob.exp().min() > 1e-3
    for T in (1.0, 2.0):
        for tail in TAILS:
            total, metrics, grad = run_loss(z, t, LossSettings(T, 0.5, tail))
            assert torch.isfinite(total) and torch.isfinite(metrics["kd"]) and torch.isfinite(grad).all()
            assert metrics["kd"] >= 0
            want = ref_grad(lambda x: 0.5 * ref_kd(x, t, T, tail) + 0.5 * ref_ce(x, t.labels), z)
            cos = F.cosine_similarity(grad.double().flatten(), want.flatten(), dim=0)
            assert cos > 0.99, (T, tail, cos.item())


def test_metrics_are_detached():
    """sparse_kd_loss promises 'a dict of detached metric sums'; the trainer sums them across steps."""
    _, t, z0 = make_problem(seed=12)
    z = z0.clone().requires_grad_()
    total, metrics = sparse_kd_loss(z, t, LossSettings(1.0, 0.5, "bucket"))
    assert total.requires_grad
    assert not metrics["ce"].requires_grad, "ce metric carries an autograd graph"
    assert not metrics["kd"].requires_grad, "kd metric carries an autograd graph"


def test_kd_without_topk_signal_is_refused():
    _, t, z0 = make_problem(seed=13)
    with pytest.raises(ConfigError, match="top-k"):
        sparse_kd_loss(z0, Targets(t.labels), LossSettings())


def test_cross_entropy_loss():
    _, t, z0 = make_problem(seed=14)
    z = z0.clone().requires_grad_()
    ce, metrics = cross_entropy_loss(z, t, LossSettings())
    ce.backward()
    assert_close(ce, ref_ce(z0, t.labels), what="ce")
    assert_close(metrics["ce"], ref_ce(z0, t.labels), what="ce metric")
    assert set(metrics) == {"ce"}
    assert_close(z.grad, ref_grad(lambda x: ref_ce(x, t.labels), z0), what="ce grad")


# --------------------------------------------------------------------------------------------------
# Registry


def test_registry():
    assert set(LOSSES) >= {"ce", "kd"}
    assert get_loss("kd").fn is sparse_kd_loss and get_loss("ce").fn is cross_entropy_loss
    assert set(get_loss("kd").needs) == {"topk_ids", "topk_logprobs", "tail_logprob"}
    assert get_loss("ce").needs == ()
    with pytest.raises(ConfigError) as exc:
        get_loss("nope")
    assert "'nope'" in str(exc.value) and f"valid losses: {', '.join(sorted(LOSSES))}" in str(exc.value)
    assert {"ce", "kd", "fkl", "rkl", "jsd", "skl", "srkl", "tv", "rskd", "tfkd"} <= set(LOSSES)


def test_register_duplicate_name_raises():
    before = dict(LOSSES)
    with pytest.raises(ValueError, match="twice"):
        register_loss("kd", (), "again")(cross_entropy_loss)
    assert LOSSES == before and LOSSES["kd"].fn is sparse_kd_loss


def test_register_new_loss():
    name = "test-only-ce"
    try:
        register_loss(name, (), "test")(cross_entropy_loss)
        assert get_loss(name).fn is cross_entropy_loss
    finally:
        LOSSES.pop(name, None)
