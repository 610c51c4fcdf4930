"""Distillation losses over sparse cached teacher targets, and their registry.

Each loss is a function of (student logits [N, V], :class:`Targets`, :class:`LossSettings`) that returns
a SUM over tokens and a dict of detached metric sums; the trainer divides once by the global token count.

Soft-label KD at temperature T works on k+1 buckets: the teacher's top-k tokens and one bucket for the
rest of the vocabulary ("tail"), and the loss is ``T^2 * KL(q || p)`` between the teacher's and the
student's bucket distributions at T. The tail at T != 1 is the subtle part: the teacher's tempered tail mass
depends on how its tail is spread over V - k tokens, which a top-k cache does not keep. Two ways, both
with the student equal to the teacher as the exact optimum (property-tested at T in {0.5, 1, 2, 4}):

- exact: the cache stores the teacher's tail mass under softmax(logits / T) (``generate
  --tail-temperatures``); then q is the tempered full softmax bucketed and p the student's tempered full
  softmax bucketed, which equals dense tempered KD summed into the same buckets;
- bucket-tempered (no stored tail for this T): both sides' k+1 buckets at temperature 1 are tempered as
  if they were k+1 tokens, ``q ∝ bucket_prob^(1/T)``, the same for the student.

With ``tail: renormalize`` the tail is dropped and both distributions are renormalised over the top-k
(exact at every T). When k equals the vocabulary all of them reduce to dense KD. The fused ``kd`` loss has
a hand-written gradient (derived in :class:`_SparseKD`), which makes a KD step cost about what a
cross-entropy step costs instead of ~3x.

Add a loss: one function registered with ``register_loss(name, needs, help, config=ItsConfig)``. A loss with
parameters declares them in its own config dataclass (a :class:`~kdcache.config.Section` with ``doc(..., valid=...)``
fields, next to the loss), which is the run's ``losses.<name>`` section: parsed and range-checked only when a
run uses that loss, listed by ``kdcache fields train``, handed to the loss as ``settings.options_for(name)``.
No field of :class:`~kdcache.train.config.TrainConfig` or of :class:`LossSettings` is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from kdcache.config import Section, Valid, check_section_names, doc, section_config
from kdcache.errors import ConfigError
from kdcache.train.divergences import DIVERGENCES, buckets, gather_log_probs, student_temperature, teacher_bucket_log_probs

_MIN_TAIL = 1e-7  # floor on the student's tail mass; below float32 resolution of 1 - sum(top-k)


@dataclass
class Targets:
    labels: torch.Tensor  # [N] next-token ids
    topk_ids: torch.Tensor | None = None  # [N, k] long
    topk_logprobs: torch.Tensor | None = None  # [N, k] float32, temperature 1
    tail_logprob: torch.Tensor | None = None  # [N] float32
    sampled_ids: torch.Tensor | None = None  # [N, m] long, distinct draws per position (padding: weight 0)
    sampled_weights: torch.Tensor | None = None  # [N, m] float32 importance weights
    tail_logprob_t: torch.Tensor | None = None  # [N] float32: the teacher's exact tail mass at the run's T != 1 (else None)


@dataclass
class LossConfig(Section):
    """A loss's config section; this one, the default, has no fields (the loss has no parameters)."""


@dataclass
class LossSettings:
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the soft (KD) term; 1 - alpha goes to hard-label cross-entropy
    tail: Literal["bucket", "renormalize"] = "bucket"
    # each loss's parsed config section by loss name (a run's: loss_options(cfg)); a loss missing here runs at its defaults
    options: dict[str, Any] = field(default_factory=dict)

    def options_for(self, name: str) -> Any:
        """The parameters of loss ``name``: its section of ``options``, else its config's defaults."""
        given = self.options.get(name)
        return given if given is not None else LOSSES[name].config()


def teacher_buckets(topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, temperature: float, tail: str,
                    tail_logprob_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher probabilities over the top-k (``q`` [N, k]) and the tail bucket (``q_tail`` [N]) at T."""
    probs = teacher_bucket_log_probs(topk_logprobs, tail_logprob, temperature, tail, tail_logprob_t).exp()
    if tail == "renormalize":
        return probs, torch.zeros_like(probs[:, 0])
    return probs[:, :-1], probs[:, -1]


def _xlogx_over(q: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """sum q * (log q - logp) with 0 * log 0 = 0."""
    return torch.where(q > 0, q * (torch.log(q.clamp_min(1e-38)) - logp), torch.zeros_like(q))


_CHUNK_ROWS = 64  # 64 x 49k-vocab fp32 rows = 12 MiB: temporaries stay in the last-level cache


def _row_chunks(n: int):
    return (slice(s, min(s + _CHUNK_ROWS, n)) for s in range(0, n, _CHUNK_ROWS))


class _SparseKD(torch.autograd.Function):
    """Fused T^2-scaled sparse KD (+ optional hard-label CE) with a hand-written backward.

    The student's log-probabilities at the top-k come from its softmax at ``tau_s`` (s_k = z_k / tau_s - lse),
    its tail bucket is r = 1 - sum exp(s_k) (none when k = V), and the buckets b = [s_k, log r] are tempered
    by ``tau_b`` into logp = log_softmax(b / tau_b) (tau_b = 1: logp = b): exact mode is (tau_s, tau_b) = (T, 1),
    bucket-tempered mode (1, T). With g = dL/db, G = sum of g over the top-k and P = softmax(z / tau_s), the
    chain rule through s_k and log r gives

        dL/dz_j = (1/tau_s) * (P_j * c + [j in top-k] * (g_j - P_j * g_tail / r)),   c = -G + g_tail (1 - r) / r

    so the [N, V] work is one softmax times a per-row coefficient plus a scatter at the top-k.
    """

    @staticmethod
    def forward(ctx, logits, topk_ids, q_all, labels, temperature: float, tau_s: float, alpha: float, renormalize: bool):
        z = logits.float()
        inv_s = 1.0 / tau_s
        tau_b = temperature / tau_s
        # No tail bucket at k = vocab. Rows where only the teacher has none (all its mass in the top-k) keep the
        # student's: its term q_tail log(q_tail / p_tail) is 0, and its gradient is the true one.
        has_tail = topk_ids.shape[1] < z.shape[1]
        need_lse_1 = alpha < 1.0 and tau_s != 1.0
        lse_s = torch.empty(z.shape[0], device=z.device)
        lse_1 = torch.empty_like(lse_s) if need_lse_1 else None
        for rows in _row_chunks(z.shape[0]):  # row chunks keep the [rows, V] temporaries in cache
            zc = z[rows]
            lse_s[rows] = torch.logsumexp(zc if tau_s == 1.0 else zc * inv_s, dim=-1)
            if need_lse_1:
                lse_1[rows] = torch.logsumexp(zc, dim=-1)
        s_k = z.gather(1, topk_ids) * inv_s - lse_s[:, None]  # student log-probs at the top-k, temperature tau_s
        r = None
        if renormalize:
            logp = s_k - torch.logsumexp(s_k, dim=-1, keepdim=True)
        else:
            log_r = torch.log((-torch.expm1(torch.logsumexp(s_k, dim=-1))).clamp_min(_MIN_TAIL))
            if not has_tail:
                log_r = torch.full_like(log_r, -math.inf)
            logp = torch.cat([s_k, log_r[:, None]], dim=-1)
            if tau_b != 1.0:
                logp = torch.log_softmax(logp / tau_b, dim=-1)
            r = log_r.exp()
        kd_sum = _xlogx_over(q_all, logp).sum() * temperature**2
        if alpha < 1.0:
            lse_1 = lse_s if tau_s == 1.0 else lse_1
            ce_sum = (lse_1 - z.gather(1, labels[:, None]).squeeze(1)).sum()
        else:
            lse_1, ce_sum = None, torch.zeros((), device=z.device)
        ctx.save_for_backward(logits, topk_ids, q_all, logp.exp(), s_k.exp(), r, lse_s, labels, lse_1)
        ctx.cfg = (temperature, tau_s, alpha, renormalize, has_tail)
        total = alpha * kd_sum + (1.0 - alpha) * ce_sum
        kd_out, ce_out = kd_sum.detach(), ce_sum.detach()
        ctx.mark_non_differentiable(kd_out, ce_out)  # metrics only
        return total, kd_out, ce_out

    @staticmethod
    def backward(ctx, grad_total, _g_kd, _g_ce):
        logits, topk_ids, q_all, p, p_k, r, lse_s, labels, lse_1 = ctx.saved_tensors
        temperature, tau_s, alpha, renormalize, has_tail = ctx.cfg
        z = logits.float()
        b = 1.0 - alpha
        tau_b = temperature / tau_s
        # g = dL/db, scaled by alpha / tau_s: T^2 (p - q) / tau_b through a softmax, -T^2 q when logp = b itself
        scale = alpha * temperature**2 / tau_s
        g = (p - q_all) * (scale / tau_b) if renormalize or tau_b != 1.0 else q_all * -scale
        fused_ce = alpha < 1.0 and tau_s == 1.0  # one softmax serves both terms
        if renormalize:  # p and q both sum to 1 over the top-k: nothing off the top-k, the coefficient is 0
            coef, scatter = torch.zeros_like(g[:, 0]), g
        else:
            g_k, g_t = g[:, :-1], g[:, -1]
            ratio = g_t / r.clamp_min(_MIN_TAIL) if has_tail else torch.zeros_like(g_t)
            coef = -g_k.sum(-1) + ratio * (1.0 - r)
            scatter = g_k - p_k * ratio[:, None]
        if fused_ce:
            coef = coef + b
        grad = torch.empty_like(z)
        for rows in _row_chunks(z.shape[0]):
            zc, gr = z[rows], grad[rows]
            if renormalize and not fused_ce:
                gr.zero_()
            elif tau_s == 1.0:
                torch.sub(zc, lse_s[rows, None], out=gr).exp_().mul_(coef[rows, None])
            else:
                torch.mul(zc, 1.0 / tau_s, out=gr).sub_(lse_s[rows, None]).exp_().mul_(coef[rows, None])
            if alpha < 1.0 and not fused_ce:
                gr.add_(torch.sub(zc, lse_1[rows, None]).exp_(), alpha=b)
        grad.scatter_add_(1, topk_ids, scatter)
        if alpha < 1.0:
            grad.scatter_add_(1, labels[:, None], torch.full_like(labels[:, None], -b, dtype=grad.dtype))
        grad.mul_(grad_total)
        return grad.to(logits.dtype), None, None, None, None, None, None, None


def sparse_kd_loss(logits: torch.Tensor, targets: Targets, settings: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * T^2 * KL(teacher || student) over buckets + (1 - alpha) * CE, summed over tokens."""
    if targets.topk_ids is None:
        raise ConfigError("loss 'kd' needs the cache's topk signal; regenerate the cache with `kdcache generate --top-k K`")
    T, renormalize = settings.temperature, settings.tail == "renormalize"
    q_all = teacher_bucket_log_probs(targets.topk_logprobs, targets.tail_logprob, T, settings.tail, targets.tail_logprob_t).exp().float()
    tau_s = student_temperature(T, settings.tail, targets.tail_logprob_t)
    total, kd_sum, ce_sum = _SparseKD.apply(logits, targets.topk_ids, q_all, targets.labels, T, tau_s, settings.alpha, renormalize)
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
    config: type = LossConfig  # its section of the run's `losses` (losses.<name>.*)


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, needs: tuple[str, ...], help: str, config: type = LossConfig) -> Callable[[LossFn], LossFn]:
    """Register ``fn`` as loss ``name``; ``config`` is the dataclass of its parameters (the run's ``losses.<name>``
    section, which the loss reads as ``settings.options_for(name)``)."""
    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = LossSpec(fn, needs, help, config)
        return fn

    return deco


def loss_options(cfg: Any) -> dict[str, Any]:
    """The parsed ``losses`` section of every loss the run uses (``loss`` and the stages'), by name; the sections of
    other losses are checked for unknown loss names and keys only. For ``LossSettings(options=...)``."""
    registry = {n: spec.config for n, spec in LOSSES.items()}
    check_section_names("loss", registry, cfg.losses, "losses", keys=True)
    # an unknown `loss` itself is reported by get_loss, where the run looks it up
    return {name: section_config("loss", registry, name, cfg.losses.get(name), f"losses.{name}")
            for name in cfg.used_losses() if name in LOSSES}


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
        tau_s = student_temperature(settings.temperature, settings.tail, targets.tail_logprob_t)
        s_k, label_lp = _gather_with_labels(logits, targets.topk_ids, targets, settings, tau_s)
        t, s = buckets(s_k, targets.topk_logprobs, targets.tail_logprob, settings.temperature, settings.tail, targets.tail_logprob_t,
                       has_tail=targets.topk_ids.shape[1] < logits.shape[1])
        kd_sum = divergence(t, s, settings.options_for(name)).sum() * settings.temperature**2
        return _mix_hard_labels(name, kd_sum, label_lp, settings)

    return loss


for _name, _spec in DIVERGENCES.items():
    register_loss(_name, TOPK_SIGNALS, f"alpha * T^2 * {_spec.help} + (1 - alpha) * CE (chunked, autograd over buckets)",
                  _spec.config or LossConfig)(_divergence_loss(_name))


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


@dataclass
class VirtualTeacherConfig(Section):
    correct_prob: float = doc("The virtual teacher's probability on the label (the rest is spread uniformly over the other tokens).",
                              0.9, valid=Valid(0, 1, lo_open=True, hi_open=True))


def virtual_teacher_loss(logits: torch.Tensor, targets: Targets, settings: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Teacher-free KD with a virtual teacher (Tf-KD, Yuan et al. 2020): the target puts ``correct_prob``
    (losses.tfkd.correct_prob) on the label and spreads the rest uniformly; alpha * T^2 * KL(virtual_T || student_T)
    + (1 - alpha) * CE.

    KL(u || s) = sum u log u - a' log s_label - b' sum_{j != label} log s_j, where a', b' are the tempered
    target's probabilities and sum_j log s_j = sum_j z_j / T - V * lse(z / T): no [N, V] target is built.
    """
    tau, a = settings.temperature, settings.options_for("tfkd").correct_prob
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
              "teacher puts correct_prob on the label, the rest uniform (Tf-KD)", VirtualTeacherConfig)(virtual_teacher_loss)
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
