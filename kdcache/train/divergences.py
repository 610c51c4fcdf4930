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

A divergence with a parameter owns its config section (``JSDConfig``, ``SkewConfig`` below): the run's
``losses.<name>`` (e.g. ``losses.jsd.beta``), which the divergence receives as its third argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from kdcache.config import Section, Valid, doc

CHUNK_ROWS = 64  # rows of [rows, vocab] fp32 temporaries at a time (64 x 49k fp32 = 12 MiB)
# Floor on the student's tail mass where it is not resolved: below it 1 - sum(top-k) is fp32 rounding. Where the
# teacher's own tail is smaller, the student's is floored at the teacher's instead (see _student_tail).
MIN_TAIL = 1e-7


@dataclass
class JSDConfig(Section):
    beta: float = doc("Mixture weight of the generalized JSD: M = beta*teacher + (1-beta)*student (beta -> 0: forward-KL-like, "
                      "-> 1: reverse-KL-like).", 0.5, valid=Valid(0, 1, lo_open=True, hi_open=True))


@dataclass
class SkewConfig(Section):
    skew: float = doc("Skew: skl compares the teacher with skew*teacher + (1-skew)*student, srkl the student with "
                      "(1-skew)*teacher + skew*student (0: plain forward / reverse KL).", 0.1, valid=Valid(0, 1, hi_open=True))


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
    # the teacher's tail at the student's temperature: exact at tau, else (bucket-tempered) at 1
    s_tail = _student_tail(s_k, tail_logprob_t if tail_logprob_t is not None else tail_logprob)
    s = torch.cat([s_k, s_tail], dim=-1)
    if tempered:
        s = torch.log_softmax(s / tau, dim=-1)
    return t, torch.cat([s[:, :-1], torch.where(torch.isfinite(tail_logprob)[:, None], s[:, -1:], no_tail)], dim=-1)


def _student_tail(s_k: torch.Tensor, teacher_tail: torch.Tensor) -> torch.Tensor:
    """log of the student's mass outside the top-k, 1 - sum exp(s_k) [N, 1], from its log-probabilities there.

    Below MIN_TAIL that difference is rounding in fp32, so it carries no gradient there (as a clamp at MIN_TAIL
    would), and its value is floored at min(MIN_TAIL, the teacher's tail) per row, not at MIN_TAIL: a student
    equal to a teacher whose tail is tinier keeps that tail, so it stays the exact optimum (a MIN_TAIL floor
    put ~1e-7 of extra mass in the student's tail, which bucket tempering at T = 2 grows to ~3e-4). The floor
    never reaches 0 (a teacher's -inf tail: no tail bucket, see :func:`buckets`), so the value and every
    gradient stay finite."""
    r = -torch.expm1(torch.logsumexp(s_k, dim=-1, keepdim=True))
    teacher = teacher_tail.to(r.dtype)[:, None].exp()
    floor = torch.where(torch.isfinite(teacher_tail)[:, None], teacher.clamp(min=torch.finfo(r.dtype).tiny, max=MIN_TAIL),
                        torch.full_like(teacher, MIN_TAIL))
    resolved = torch.log(r.clamp_min(MIN_TAIL))  # the gradient flows only here, where r >= MIN_TAIL
    return torch.where(r >= MIN_TAIL, resolved, torch.log(torch.maximum(r.detach(), floor)))


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


class DivergenceSpec(NamedTuple):
    fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (teacher log-p, student log-p, options) -> [N]
    help: str
    config: type | None = None  # its config section (losses.<name>); None: no parameters


DIVERGENCES: dict[str, DivergenceSpec] = {
    "fkl": DivergenceSpec(fkl, "forward KL(teacher || student): mode-covering, the classic soft-label KD"),
    "rkl": DivergenceSpec(rkl, "reverse KL(student || teacher): mode-seeking, favours generation quality"),
    "jsd": DivergenceSpec(jsd, "generalized Jensen-Shannon with weight beta (beta -> 0: forward-KL-like, 1: reverse-KL-like)", JSDConfig),
    "skl": DivergenceSpec(skl, "skew KL(teacher || skew*teacher + (1-skew)*student): bounded, stable early in training", SkewConfig),
    "srkl": DivergenceSpec(srkl, "skew reverse KL(student || (1-skew)*teacher + skew*student)", SkewConfig),
    "tv": DivergenceSpec(tv, "total variation distance 1/2 sum |teacher - student|"),
}


def dense_divergence(name: str, teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float, options: Any = None) -> torch.Tensor:
    """tau^2 * divergence summed over tokens, on full distributions: the reference for tests. ``options`` are the
    divergence's parameters (e.g. ``JSDConfig(beta=0.3)``, or any object with those attributes); None: its defaults."""
    spec = DIVERGENCES[name]
    if options is None and spec.config is not None:
        options = spec.config()
    t = torch.log_softmax(teacher_logits.double() / tau, dim=-1)
    s = torch.log_softmax(student_logits.double() / tau, dim=-1)
    return spec.fn(t, s, options).sum() * tau**2
