"""From teacher logits to the numbers a cache keeps: top-k, tail mass, entropy, the target's log-probability
(and, when asked, sampled tokens and tempered tail masses), computed on the teacher's device.

Why more than one way: the plain way upcasts a chunk of logits [n, V] to float32 and takes log_softmax, then
entropy, top-k and a masked copy for the tail, about a dozen passes over an fp32 [n, V] that does not fit in
any cache. On a GPU with a bf16 teacher that costs ~30% over the logits forward (issue 13). ``fused`` takes
the top-k on the logits as the model computed them (bf16 -> fp32 is exact, so the set and order are those of
an fp32 copy) and reduces the normaliser, entropy, tail and target over blocks of rows small enough to stay
in cache, so an fp32 [n, V] never exists; ``compiled`` gives the same block function to torch.compile, which
fuses it into a few reductions over the chunk (0.12x of naive's time per chunk on CPU). All three agree to
float32 rounding (tests/test_capture.py checks each against a float64 reference), so the choice is not part of
a cache's settings and a cache may be resumed with another.

``auto`` (the default) picks compiled on CUDA and fused elsewhere. Add a capture with
``@register_capture("name")`` on a function ``(logits, targets, spec, uniforms) -> dict``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from kdcache.errors import ConfigError, KDCacheError
from kdcache.modeling import tempered_tail_logprob
from kdcache.pipeline.teachers.sampling import sample_sparse


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture per position."""

    k: int  # top-k kept (0: none)
    tail_temperatures: tuple[float, ...] = ()  # exact tempered tail masses stored for these T
    sampling_temperature: float = 1.0  # proposal temperature of sampled tokens (when uniforms are given)
    block_bytes: int | None = None  # fused: rows per block so one fp32 block is about this size (None: by device)


# fused's blocks: a few fp32 copies of a block should stay in cache (CPU: 2-4 MiB measured best, see
# docs/benchmarks.md; CUDA: sized for an H100/H200's 50 MiB L2, unmeasured: no GPU lent yet)
_BLOCK_BYTES = {"cpu": 4 << 20, "cuda": 16 << 20}


CaptureFn = Callable[[torch.Tensor, torch.Tensor, CaptureSpec, "torch.Tensor | None"], dict]
_CAPTURES: dict[str, CaptureFn] = {}


def register_capture(name: str) -> Callable[[CaptureFn], CaptureFn]:
    def add(fn: CaptureFn) -> CaptureFn:
        _CAPTURES[name] = fn
        return fn

    return add


def get_capture(name: str) -> CaptureFn:
    if name not in _CAPTURES:
        raise ConfigError(f"unknown capture {name!r}; choose auto or one of {', '.join(sorted(_CAPTURES))} (--set capture=NAME)")
    return _CAPTURES[name]


def capture_names() -> list[str]:
    return sorted(_CAPTURES)


def resolve_capture(name: str, device: torch.device) -> CaptureFn:
    """``auto``: compiled on CUDA (inductor's fused kernels; triton ships with CUDA builds of torch), fused
    elsewhere (compiling needs a C++ compiler on CPU and takes seconds per run)."""
    if name == "auto":
        name = "compiled" if device.type == "cuda" else "fused"
    return get_capture(name)


def capture_positions(
    feats: torch.Tensor, head: Callable | None, targets: torch.Tensor, vocab_size: int, spec: CaptureSpec,
    capture: CaptureFn, chunk_tokens: int, uniforms: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``head`` (None: ``feats`` are logits) over ``chunk_tokens`` positions at a time and ``capture``
    each chunk's logits [n, vocab_size] in the model's dtype; the chunks' results concatenated (on the device)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, feats.shape[0], chunk_tokens):
        f = feats[start : start + chunk_tokens]
        logits = (head(f) if head is not None else f)[:, :vocab_size]
        u = uniforms[start : start + f.shape[0]] if uniforms is not None else None
        for name, value in capture(logits, targets[start : start + f.shape[0]], spec, u).items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def _from_logprobs(logp: torch.Tensor, index: torch.Tensor | None, spec: CaptureSpec, u: torch.Tensor | None) -> dict:
    """The outputs that need the whole fp32 log-distribution: tempered tails and sampled tokens."""
    out = {}
    if spec.tail_temperatures and index is not None:
        out["tail_logprob_tempered"] = tempered_tail_logprob(logp, index, spec.tail_temperatures)
    if u is not None:
        s_ids, s_w, s_n = sample_sparse(logp, u, spec.sampling_temperature)
        out.update(sampled_ids=s_ids.int(), sampled_weights=s_w, sampled_sizes=s_n)
    return out


@register_capture("naive")
def naive_capture(logits: torch.Tensor, targets: torch.Tensor, spec: CaptureSpec, u: torch.Tensor | None) -> dict:
    """The chunk upcast to fp32 and log_softmax'ed whole: the reference the others must match."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = {
        "target_logprob": logp.gather(-1, targets[:, None]).squeeze(-1),
        "entropy": -(logp.exp() * logp).nan_to_num().sum(-1),
    }
    index = None
    if spec.k:
        values, index = logp.topk(spec.k, dim=-1)
        if spec.k < logp.shape[-1]:
            tail = torch.logsumexp(logp.scatter(-1, index, float("-inf")), dim=-1)
        else:
            tail = torch.full_like(values[:, 0], float("-inf"))
        out.update(topk_ids=index.int(), topk_logprobs=values, tail_logprob=tail)
    return {**out, **_from_logprobs(logp, index, spec, u)}


def block_stats(logits: torch.Tensor, kth: torch.Tensor | None, k: int, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(log normaliser, entropy, target log-prob, tail log-mass) of rows of ``logits`` in any float dtype,
    accumulated in fp32 in one copy of the rows, updated in place. The tail is everything below the k-th
    largest logit ``kth`` plus the ties at it that the top-k left out (the rows' count of logits >= kth,
    minus k), so there is no masked copy and no ``1 - sum(top-k)`` cancellation to lose a small tail."""
    lowest = torch.finfo(torch.float32).min
    d = logits.to(torch.float32, copy=True)
    m = d.amax(-1, keepdim=True).clamp_min_(lowest)  # a row of -inf stays finite
    d.sub_(m)
    target = d.gather(-1, targets[:, None]).squeeze(-1)
    e = d.exp()
    s = e.sum(-1)
    log_s = s.log()
    d.clamp_min_(lowest)  # masked (-inf) tokens have e = 0: 0 * lowest is 0, 0 * -inf would be nan
    entropy = log_s - torch.linalg.vecdot(e, d) / s
    lse = m.squeeze(-1) + log_s
    if kth is None:
        return lse, entropy, target - log_s, None
    at_or_above = logits >= kth[:, None]
    left_out_ties = at_or_above.sum(-1) - k
    below = e.masked_fill_(at_or_above, 0.0).sum(-1)
    tail = (below + left_out_ties * (kth.float() - m.squeeze(-1)).exp()).log() - log_s
    return lse, entropy, target - log_s, tail


def _blockwise(logits: torch.Tensor, targets: torch.Tensor, spec: CaptureSpec, u: torch.Tensor | None,
               stats: Callable, rows: int) -> dict:
    n = logits.shape[0]
    top, index = logits.topk(spec.k, dim=-1) if spec.k else (None, None)
    kth = top[:, -1] if top is not None else None
    parts: dict[str, list[torch.Tensor]] = {}
    for s in range(0, n, rows):
        b = slice(s, s + rows)
        lse, entropy, target, tail = stats(logits[b], kth[b] if kth is not None else None, spec.k, targets[b])
        got = {"target_logprob": target, "entropy": entropy, "lse": lse}
        if tail is not None:
            got["tail_logprob"] = tail
        if spec.tail_temperatures or u is not None:  # these need the block's whole log-distribution
            logp = logits[b].float() - lse[:, None]
            got.update(_from_logprobs(logp, index[b] if index is not None else None, spec, u[b] if u is not None else None))
        for name, value in got.items():
            parts.setdefault(name, []).append(value)
    out = {name: torch.cat(values) for name, values in parts.items()}
    lse = out.pop("lse")
    if top is not None:
        out.update(topk_ids=index.int(), topk_logprobs=top.float() - lse[:, None])
    return out


@register_capture("fused")
def fused_capture(logits: torch.Tensor, targets: torch.Tensor, spec: CaptureSpec, u: torch.Tensor | None) -> dict:
    """Top-k in the model's dtype; the fp32 reductions over cache-sized blocks of rows."""
    block = spec.block_bytes or _BLOCK_BYTES.get(logits.device.type, 4 << 20)
    rows = max(1, block // (4 * logits.shape[-1]))
    return _blockwise(logits, targets, spec, u, block_stats, rows)


@functools.lru_cache(maxsize=1)
def _compiled_stats() -> Callable:
    return torch.compile(block_stats, dynamic=True)


@register_capture("compiled")
def compiled_capture(logits: torch.Tensor, targets: torch.Tensor, spec: CaptureSpec, u: torch.Tensor | None) -> dict:
    """The block function compiled (inductor fuses it into a few passes over the chunk), over the whole
    chunk at once; tempered tails and sampling still build the chunk's fp32 log-distribution."""
    try:
        return _blockwise(logits, targets, spec, u, _compiled_stats(), logits.shape[0])
    except Exception as exc:  # inductor's failures (no compiler, no triton) come as many exception types
        if "torch._dynamo" not in type(exc).__module__ and "torch._inductor" not in type(exc).__module__:
            raise
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise KDCacheError(f"capture=compiled: torch.compile failed on {logits.device.type} ({first}); "
                           "pass --set capture=fused") from None
