"""Distillation losses over sparse cached teacher targets, and their registry.

Each loss is a function of (student logits [N, V], :class:`Targets`, :class:`LossSettings`) that returns
a SUM over tokens and a dict of detached metric sums; the trainer divides once by the global token count.

Soft-label KD at temperature T works on k+1 buckets: the teacher's top-k tokens and one bucket for the
rest of the vocabulary ("tail"). The teacher's bucket probabilities are re-tempered as
``q ∝ exp(logprob / T)`` (the tail bucket uses its stored log-mass), the student's full softmax at T is
summed into the same buckets, and the loss is ``T^2 * KL(q || p)``. With ``tail: renormalize`` the tail is
dropped and both distributions are renormalised over the top-k. When k equals the vocabulary both
reduce to dense KD. The gradient is written by hand (``dL/dz = (P * w - q) / T`` with a per-token weight
on non-top-k entries), which makes a KD step cost about what a cross-entropy step costs instead of ~3x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from kdcache.errors import ConfigError
from kdcache.train.divergences import DIVERGENCES, buckets, gather_log_probs

_MIN_TAIL = 1e-7  # floor on the student's tail mass; below float32 resolution of 1 - sum(top-k)


@dataclass
class Targets:
    labels: torch.Tensor  # [N] next-token ids
    topk_ids: torch.Tensor | None = None  # [N, k] long
    topk_logprobs: torch.Tensor | None = None  # [N, k] float32, temperature 1
    tail_logprob: torch.Tensor | None = None  # [N] float32
    sampled_ids: torch.Tensor | None = None  # [N, m] long, distinct draws per position (padding: weight 0)
    sampled_weights: torch.Tensor | None = None  # [N, m] float32 importance weights


@dataclass
class LossSettings:
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the soft (KD) term; 1 - alpha goes to hard-label cross-entropy
    tail: Literal["bucket", "renormalize"] = "bucket"
    beta: float = 0.5  # generalized JSD mixture weight
    skew: float = 0.1  # skew (reverse) KL mixture weight
    correct_prob: float = 0.9  # virtual teacher (tfkd): probability on the label


def teacher_buckets(topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, temperature: float, tail: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher probabilities over the top-k (``q`` [N, k]) and the tail bucket (``q_tail`` [N]) at T."""
    if tail == "renormalize":
        q = torch.softmax(topk_logprobs / temperature, dim=-1)
        return q, torch.zeros_like(q[:, 0])
    both = torch.cat([topk_logprobs, tail_logprob[:, None]], dim=-1) / temperature
    probs = torch.softmax(both, dim=-1)
    return probs[:, :-1], probs[:, -1]


def _xlogx_over(q: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """sum q * (log q - logp) with 0 * log 0 = 0."""
    return torch.where(q > 0, q * (torch.log(q.clamp_min(1e-38)) - logp), torch.zeros_like(q))


_CHUNK_ROWS = 64  # 64 x 49k-vocab fp32 rows = 12 MiB: temporaries stay in the last-level cache


def _row_chunks(n: int):
    return (slice(s, min(s + _CHUNK_ROWS, n)) for s in range(0, n, _CHUNK_ROWS))


class _SparseKD(torch.autograd.Function):
    """Fused T^2-scaled sparse KD (+ optional hard-label CE) with a hand-written backward."""

    @staticmethod
    def forward(ctx, logits, topk_ids, q, q_tail, labels, temperature: float, alpha: float, renormalize: bool):
        z = logits.float()
        inv_t = 1.0 / temperature
        need_lse_1 = alpha < 1.0 and temperature != 1.0
        lse_t = torch.empty(z.shape[0], device=z.device)
        lse_1 = torch.empty_like(lse_t) if need_lse_1 else None
        for rows in _row_chunks(z.shape[0]):  # row chunks keep the [rows, V] temporaries in cache
            zc = z[rows]
            lse_t[rows] = torch.logsumexp(zc if temperature == 1.0 else zc * inv_t, dim=-1)
            if need_lse_1:
                lse_1[rows] = torch.logsumexp(zc, dim=-1)
        s_k = z.gather(1, topk_ids) * inv_t - lse_t[:, None]  # student log-probs at the top-k, temperature T
        if renormalize:
            s_k_norm = s_k - torch.logsumexp(s_k, dim=-1, keepdim=True)
            kd = _xlogx_over(q, s_k_norm).sum(-1)
            ratio = None
            saved_k = s_k_norm.exp()
        else:
            log_r = torch.log((-torch.expm1(torch.logsumexp(s_k, dim=-1))).clamp_min(_MIN_TAIL))
            kd = _xlogx_over(q, s_k).sum(-1) + _xlogx_over(q_tail, log_r)
            ratio = q_tail / log_r.exp()  # q_tail / r
            saved_k = s_k.exp()
        kd_sum = kd.sum() * temperature**2
        if alpha < 1.0:
            lse_1 = lse_t if temperature == 1.0 else lse_1
            ce_sum = (lse_1 - z.gather(1, labels[:, None]).squeeze(1)).sum()
        else:
            lse_1, ce_sum = None, torch.zeros((), device=z.device)
        ctx.save_for_backward(logits, topk_ids, q, saved_k, lse_t, labels, ratio, lse_1)
        ctx.cfg = (temperature, alpha, renormalize)
        total = alpha * kd_sum + (1.0 - alpha) * ce_sum
        kd_out, ce_out = kd_sum.detach(), ce_sum.detach()
        ctx.mark_non_differentiable(kd_out, ce_out)  # metrics only
        return total, kd_out, ce_out

    @staticmethod
    def backward(ctx, grad_total, _g_kd, _g_ce):
        logits, topk_ids, q, p_k, lse_t, labels, ratio, lse_1 = ctx.saved_tensors
        temperature, alpha, renormalize = ctx.cfg
        z = logits.float()
        a = alpha * temperature  # T^2 scaling times the 1/T of d(z/T)/dz
        b = 1.0 - alpha
        # dL/dz = a * (P * w - scatter(q)) with P the softmax at T, w = 1 on the top-k and (1 - q_tail / r)
        # elsewhere (renormalize: w = 0 off the top-k); plus b * (softmax(z) - onehot(label)) for the CE part.
        fused_ce = alpha < 1.0 and temperature == 1.0 and not renormalize  # one softmax serves both terms
        coef = None if renormalize else a * (1.0 - ratio) + (b if fused_ce else 0.0)
        grad = torch.empty_like(z)
        for rows in _row_chunks(z.shape[0]):
            zc, g = z[rows], grad[rows]
            if renormalize:
                g.zero_()
            else:
                if temperature == 1.0:
                    torch.sub(zc, lse_t[rows, None], out=g)
                else:
                    torch.mul(zc, 1.0 / temperature, out=g).sub_(lse_t[rows, None])
                g.exp_().mul_(coef[rows, None])
            if alpha < 1.0 and not fused_ce:
                g.add_(torch.sub(zc, lse_1[rows, None]).exp_(), alpha=b)
        if renormalize:
            grad.scatter_add_(1, topk_ids, a * (p_k - q))
        else:
            grad.scatter_add_(1, topk_ids, a * (p_k * ratio[:, None] - q))
        if alpha < 1.0:
            grad.scatter_add_(1, labels[:, None], torch.full_like(labels[:, None], -b, dtype=grad.dtype))
        grad.mul_(grad_total)
        return grad.to(logits.dtype), None, None, None, None, None, None, None


def sparse_kd_loss(logits: torch.Tensor, targets: Targets, settings: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * T^2 * KL(teacher || student) over buckets + (1 - alpha) * CE, summed over tokens."""
    if targets.topk_ids is None:
        raise ConfigError("loss 'kd' needs the cache's topk signal; regenerate the cache with `kdcache generate --top-k K`")
    q, q_tail = teacher_buckets(targets.topk_logprobs, targets.tail_logprob, settings.temperature, settings.tail)
    total, kd_sum, ce_sum = _SparseKD.apply(
        logits, targets.topk_ids, q, q_tail, targets.labels, settings.temperature, settings.alpha, settings.tail == "renormalize"
    )
    metrics = {"kd": kd_sum}
    if settings.alpha < 1.0:
        metrics["ce"] = ce_sum
    return total, metrics


def cross_entropy_loss(logits: torch.Tensor, targets: Targets, settings: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hard-label cross-entropy only: the no-teacher baseline."""
    ce = F.cross_entropy(logits.float(), targets.labels, reduction="sum")
    return ce, {"ce": ce.detach()}


LossFn = Callable[[torch.Tensor, Targets, LossSettings], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    needs: tuple[str, ...]  # cache columns the loss reads beyond input_ids/loss_mask
    help: str


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, needs: tuple[str, ...], help: str) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = LossSpec(fn, needs, help)
        return fn

    return deco


register_loss("ce", (), "hard-label cross-entropy on the cached tokens (baseline, ignores the teacher)")(cross_entropy_loss)
register_loss(
    "kd",
    ("topk_ids", "topk_logprobs", "tail_logprob"),  # = fkl, fused
    "alpha * T^2 * KL over the cached top-k (+ tail bucket) + (1 - alpha) * hard-label CE",
)(sparse_kd_loss)


TOPK_SIGNALS = ("topk_ids", "topk_logprobs", "tail_logprob")


def _gather_with_labels(logits: torch.Tensor, ids: torch.Tensor, targets: Targets, settings: LossSettings, tau: float):
    """Student log-probabilities at ``ids`` (temperature ``tau``) and, when hard labels are mixed in, at the
    labels (temperature 1). At tau = 1 both come out of one chunked pass over the vocabulary."""
    if settings.alpha >= 1.0:
        return gather_log_probs(logits, ids, tau), None
    if tau == 1.0:
        both = gather_log_probs(logits, torch.cat([ids, targets.labels[:, None]], dim=1))
        return both[:, :-1], both[:, -1]
    return gather_log_probs(logits, ids, tau), gather_log_probs(logits, targets.labels[:, None])[:, 0]


def _mix_hard_labels(name: str, kd_sum: torch.Tensor, label_logprob: torch.Tensor | None, settings: LossSettings):
    """alpha * kd_sum + (1 - alpha) * hard-label CE, with both terms as metrics."""
    total, metrics = settings.alpha * kd_sum, {name: kd_sum.detach()}
    if label_logprob is not None:
        ce_sum = -label_logprob.sum()
        total = total + (1.0 - settings.alpha) * ce_sum
        metrics["ce"] = ce_sum.detach()
    return total, metrics


def _divergence_loss(name: str) -> LossFn:
    divergence = DIVERGENCES[name][0]

    def loss(logits: torch.Tensor, targets: Targets, settings: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if targets.topk_ids is None:
            raise ConfigError(f"loss {name!r} needs the cache's topk signal; regenerate the cache with `kdcache generate --top-k K`")
        s_k, label_lp = _gather_with_labels(logits, targets.topk_ids, targets, settings, settings.temperature)
        t, s = buckets(s_k, targets.topk_logprobs, targets.tail_logprob, settings.temperature, settings.tail)
        kd_sum = divergence(t, s, settings).sum() * settings.temperature**2
        return _mix_hard_labels(name, kd_sum, label_lp, settings)

    return loss


for _name, (_fn, _help) in DIVERGENCES.items():
    register_loss(_name, TOPK_SIGNALS, f"alpha * T^2 * {_help} + (1 - alpha) * CE (chunked, autograd over buckets)")(_divergence_loss(_name))


SAMPLED_SIGNALS = ("sampled_ids", "sampled_weights", "sampled_sizes")


def sampled_kd_loss(logits: torch.Tensor, targets: Targets, settings: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RS-KD: cross-entropy of the student against the cached importance-weighted draws. In expectation
    its gradient is that of full-vocabulary KL(teacher || student) at temperature 1."""
    if targets.sampled_ids is None:
        raise ConfigError("loss 'rskd' needs the cache's sampled signal; regenerate the cache with `kdcache generate --sampled-tokens N`")
    if settings.temperature != 1.0:
        raise ConfigError("loss 'rskd' estimates the temperature-1 teacher; pass --temperature 1 (set the proposal with --set proposal_temperature=... at generate time)")
    s_k, label_lp = _gather_with_labels(logits, targets.sampled_ids, targets, settings, 1.0)
    kd_sum = -(targets.sampled_weights * s_k).sum()
    return _mix_hard_labels("rskd", kd_sum, label_lp, settings)


def virtual_teacher_loss(logits: torch.Tensor, targets: Targets, settings: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Teacher-free KD with a virtual teacher (Tf-KD, Yuan et al. 2020): the target puts ``correct_prob``
    on the label and spreads the rest uniformly; alpha * T^2 * KL(virtual_T || student_T) + (1 - alpha) * CE.

    KL(u || s) = sum u log u - a' log s_label - b' sum_{j != label} log s_j, where a', b' are the tempered
    target's probabilities and sum_j log s_j = sum_j z_j / T - V * lse(z / T): no [N, V] target is built.
    """
    tau, a = settings.temperature, settings.correct_prob
    z, labels = logits, targets.labels[:, None]
    V = z.shape[-1]
    # The virtual teacher at temperature tau: softmax of log-probabilities (log a, log((1-a)/(V-1))) / tau.
    la, lb = math.log(a) / tau, math.log((1.0 - a) / (V - 1)) / tau
    norm = math.log(math.exp(la) + (V - 1) * math.exp(lb))
    pa, pb = math.exp(la - norm), math.exp(lb - norm)
    neg_entropy = pa * math.log(pa) + (V - 1) * pb * math.log(pb)
    log_s_label = gather_log_probs(z, labels, tau)[:, 0]
    dt = log_s_label.dtype  # fp32, or fp64 for fp64 logits
    lse = z.gather(1, labels)[:, 0].to(dt) / tau - log_s_label
    sum_log_s = z.to(dt).sum(-1) / tau - V * lse
    kl = neg_entropy - pa * log_s_label - pb * (sum_log_s - log_s_label)
    kd_sum = kl.sum() * tau**2
    label_lp = None if settings.alpha >= 1.0 else log_s_label if tau == 1.0 else gather_log_probs(z, labels)[:, 0]
    return _mix_hard_labels("tfkd", kd_sum, label_lp, settings)


register_loss("tfkd", (), "teacher-free: alpha * T^2 * KL(virtual teacher || student) + (1 - alpha) * CE; the virtual "
              "teacher puts correct_prob on the label, the rest uniform (Tf-KD)")(virtual_teacher_loss)
register_loss("rskd", SAMPLED_SIGNALS, "alpha * cross-entropy to the cached sampled sparse targets (unbiased KD) + (1 - alpha) * CE")(sampled_kd_loss)


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


@torch.no_grad()
def dense_reference_kd(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) summed over tokens, on full distributions (for tests and checks)."""
    t = torch.log_softmax(teacher_logprobs / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum() * temperature**2
