"""The divergence family over sparse cached targets: forward/reverse KL, generalized JSD, skew KL,
skew reverse KL, total variation.

Every divergence here is a function of two small distributions over the same buckets: the teacher's
top-k tokens plus one tail bucket (or the top-k renormalised), and the student's mass on those
buckets. So the only [tokens, vocab] work is turning student logits into bucket log-probabilities,
which :class:`_GatherLogProbs` does in row chunks with a hand-written backward: the KD term never holds
more than a chunk of [tokens, vocab] temporaries (plus the gradient of the logits, which any loss
needs). The divergence itself is ordinary autograd over [tokens, k+1]. With k equal to the vocabulary
each one equals the dense divergence on full distributions (tests).

Conventions (teacher T, student S, both at temperature tau, loss scaled by tau^2):
  fkl  = KL(T || S)                                   mode-covering
  rkl  = KL(S || T)                                   mode-seeking
  jsd  = beta KL(T || M) + (1-beta) KL(S || M),  M = beta T + (1-beta) S   (generalized JSD, GKD)
  skl  = KL(T || skew T + (1-skew) S)                 skew KL (DistiLLM)
  srkl = KL(S || (1-skew) T + skew S)                 skew reverse KL (DistiLLM)
  tv   = 1/2 sum |T - S|
"""

from __future__ import annotations

import math
from typing import Callable

import torch

CHUNK_ROWS = 64  # rows of [rows, vocab] fp32 temporaries at a time (64 x 49k fp32 = 12 MiB)
MIN_TAIL = 1e-7  # floor on the student's tail mass: below fp32 resolution of 1 - sum(top-k)


def _chunks(n: int, rows: int):
    return (slice(s, min(s + rows, n)) for s in range(0, n, rows))


class _GatherLogProbs(torch.autograd.Function):
    """log_softmax(z / tau) at ``ids`` [N, m], computed and differentiated in row chunks."""

    @staticmethod
    def forward(ctx, z, ids, tau: float, chunk_rows: int):
        dt = torch.promote_types(z.dtype, torch.float32)  # bf16/fp16 logits are reduced in fp32
        lse = torch.empty(z.shape[0], device=z.device, dtype=dt)
        for rows in _chunks(z.shape[0], chunk_rows):
            lse[rows] = torch.logsumexp(z[rows].to(dt) / tau, dim=-1)
        out = z.gather(1, ids).to(dt) / tau - lse[:, None]
        ctx.save_for_backward(z, ids, lse)
        ctx.cfg = (tau, chunk_rows)
        return out

    @staticmethod
    def backward(ctx, g):
        z, ids, lse = ctx.saved_tensors
        tau, chunk_rows = ctx.cfg
        # d log_softmax(z/tau)_i / dz_j = (delta_ij - softmax_j) / tau
        grad = torch.empty(z.shape, dtype=lse.dtype, device=z.device)
        g_sum = g.sum(-1, keepdim=True)
        for rows in _chunks(z.shape[0], chunk_rows):
            torch.sub(z[rows].to(lse.dtype) / tau, lse[rows, None], out=grad[rows])
            grad[rows].exp_().mul_(-g_sum[rows])
        grad.scatter_add_(1, ids, g)
        grad.div_(tau)
        return grad.to(z.dtype), None, None, None


def gather_log_probs(z: torch.Tensor, ids: torch.Tensor, tau: float = 1.0, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Student log-probabilities at temperature ``tau`` of the tokens ``ids`` [N, m] (chunked, see above)."""
    return _GatherLogProbs.apply(z, ids, tau, chunk_rows)


def student_temperature(tau: float, tail: str, tail_logprob_t: torch.Tensor | None) -> float:
    """Temperature of the student softmax whose log-probabilities at the top-k feed the buckets.

    Exact (renormalised top-k, or a stored tempered teacher tail): the student's softmax at ``tau``, bucketed.
    Otherwise the k+1 buckets themselves are tempered on both sides, so the student's come from its softmax at 1.
    """
    return tau if tail == "renormalize" or tail_logprob_t is not None or tau == 1.0 else 1.0


def bucket_log_probs(
    z: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor,
    tau: float, tail: str, tail_logprob_t: torch.Tensor | None = None, chunk_rows: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probabilities over the same buckets [N, B] at temperature ``tau``.

    ``tail="bucket"``: B = k+1, the last bucket holds everything outside the top-k. With ``tail_logprob_t``
    (the teacher's exact tail mass at ``tau``, stored by generate) both sides are the tempered full softmax,
    bucketed: exact. Without it, the teacher's tail at ``tau`` is unknown (it depends on how the tail mass is
    spread), so both sides' k+1 buckets at temperature 1 are tempered as k+1 tokens: a consistent
    approximation (the student equal to the teacher is still the optimum). Where the teacher has no tail
    (k = vocab) both tails are empty. ``tail="renormalize"``: B = k, both renormalised over the top-k (exact).
    """
    tau_s = student_temperature(tau, tail, tail_logprob_t)
    return buckets(gather_log_probs(z, topk_ids, tau_s, chunk_rows), topk_logprobs, tail_logprob, tau, tail, tail_logprob_t,
                   has_tail=topk_ids.shape[1] < z.shape[1])


def teacher_bucket_log_probs(topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, tau: float, tail: str,
                             tail_logprob_t: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's log-probabilities over the buckets at ``tau`` (see :func:`bucket_log_probs`)."""
    if tail == "renormalize":
        return torch.log_softmax(topk_logprobs / tau, dim=-1)
    if tail_logprob_t is not None:  # exact: the top-k share 1 - tail_t in proportion to p^(1/tau)
        head = torch.log((-torch.expm1(tail_logprob_t)).clamp_min(1e-38))
        return torch.cat([torch.log_softmax(topk_logprobs / tau, dim=-1) + head[:, None], tail_logprob_t[:, None]], dim=-1)
    return torch.log_softmax(torch.cat([topk_logprobs, tail_logprob[:, None]], dim=-1) / tau, dim=-1)


def buckets(s_k: torch.Tensor, topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, tau: float, tail: str,
            tail_logprob_t: torch.Tensor | None = None, has_tail: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bucket_log_probs` from the student's log-probabilities ``s_k`` at the top-k ids, already gathered
    at :func:`student_temperature`; ``has_tail`` is False when the top-k is the whole vocabulary."""
    t = teacher_bucket_log_probs(topk_logprobs, tail_logprob, tau, tail, tail_logprob_t)
    if tail == "renormalize":
        return t, torch.log_softmax(s_k, dim=-1)
    tempered = student_temperature(tau, tail, tail_logprob_t) != tau  # bucket-tempered approximation
    # No tail bucket at k = vocab (a constant -inf, outside the tempering too). Where only the teacher has none
    # (all its mass in the top-k) the student's bucket takes part in tempering and is then dropped: forward KL
    # is unchanged by that (its term is 0 log 0), and reverse KL stays finite instead of infinite.
    no_tail = torch.full_like(s_k[:, :1], -math.inf)
    if not has_tail:
        return t, torch.cat([torch.log_softmax(s_k / tau, dim=-1) if tempered else s_k, no_tail], dim=-1)
    s_tail = torch.log((-torch.expm1(torch.logsumexp(s_k, dim=-1, keepdim=True))).clamp_min(MIN_TAIL))
    s = torch.cat([s_k, s_tail], dim=-1)
    if tempered:
        s = torch.log_softmax(s / tau, dim=-1)
    return t, torch.cat([s[:, :-1], torch.where(torch.isfinite(tail_logprob)[:, None], s[:, -1:], no_tail)], dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row, with 0 log 0 = 0 (empty buckets contribute nothing, and no NaN reaches a gradient)."""
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, torch.zeros_like(a))).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1-w) b), stable for empty buckets."""
    if w <= 0.0:
        return log_b
    if w >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def fkl(t, s, p):
    return _kl(t, s)


def rkl(t, s, p):
    return _kl(s, t)


def jsd(t, s, p):
    m = _log_mix(t, s, p.beta)
    return p.beta * _kl(t, m) + (1.0 - p.beta) * _kl(s, m)


def skl(t, s, p):
    return _kl(t, _log_mix(t, s, p.skew))


def srkl(t, s, p):
    return _kl(s, _log_mix(t, s, 1.0 - p.skew))


def tv(t, s, p):
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


Divergence = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]  # (teacher log-p, student log-p, settings) -> [N]
DIVERGENCES: dict[str, tuple[Divergence, str]] = {
    "fkl": (fkl, "forward KL(teacher || student): mode-covering, the classic soft-label KD"),
    "rkl": (rkl, "reverse KL(student || teacher): mode-seeking, favours generation quality"),
    "jsd": (jsd, "generalized Jensen-Shannon with weight beta (beta -> 0: forward-KL-like, 1: reverse-KL-like)"),
    "skl": (skl, "skew KL(teacher || skew*teacher + (1-skew)*student): bounded, stable early in training"),
    "srkl": (srkl, "skew reverse KL(student || (1-skew)*teacher + skew*student)"),
    "tv": (tv, "total variation distance 1/2 sum |teacher - student|"),
}


def dense_divergence(name: str, teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float, settings) -> torch.Tensor:
    """tau^2 * divergence summed over tokens, on full distributions: the reference for tests."""
    t = torch.log_softmax(teacher_logits.double() / tau, dim=-1)
    s = torch.log_softmax(student_logits.double() / tau, dim=-1)
    return DIVERGENCES[name][0](t, s, settings).sum() * tau**2
