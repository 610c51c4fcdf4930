"""Sequence packing: a micro-batch's examples laid end to end in as few rows as fit, instead of each padded to the longest.

A packed :class:`~kdcache.train.data.Batch` has the fields of a padded one (``data.collate``) with two differences:

- ``attention_mask`` holds segment ids, [R, L]: 0 for padding, 1, 2, ... for the examples of a row in the order
  they sit. A padded batch's 0/1 mask is the case of one example per row, so whatever only asks "is this a real
  token" (``mask.bool()``) reads both alike. The per-token positions (:func:`position_ids`, restarting at 0 at each
  example) and the block-diagonal causal mask (:func:`block_causal_mask`) are functions of it, so the batch holds
  one source of truth;
- the examples are reordered to the order they sit in the rows (row by row, left to right), so the targets,
  flattened in that order, line up with the student's logits at ``select`` read row-major, as the losses expect.
  A loss is a sum over targets divided once by the number of target tokens: the order changes nothing, the totals
  are those of the padded batch.

Each example keeps its own targets: the last token of an example predicts nothing (``select`` is False there), so
no target crosses into the next example.

The student: the trainer calls the decoder with ``input_ids`` and ``attention_mask`` only (kdcache.modeling), so
:func:`enable` hooks the decoder to turn a segment mask into what transformers 5 takes for packed sequences:
``position_ids`` restarting per example, no 2-D mask and no KV cache (``use_cache=False``). transformers then
builds the block-diagonal causal mask itself, in the form its attention implementation needs (a boolean mask for
sdpa, an additive float mask for eager, a block mask for flex, sequence lengths for flash attention). Measured on
transformers 5.19 (Llama, CPU): that path gives each example the logits it has alone (sdpa and eager); a 4-D boolean
mask is right for sdpa and wrong for eager (added as 0/1); a segment-id 2-D mask, or packed ``position_ids`` with the
default ``use_cache``, silently lets examples attend to each other. :func:`enable` checks the student on two tiny
sequences and refuses one whose attention crosses the boundary anyway.

Rows are as long as the micro-batch's longest example (``max_length`` to change it), filled first-fit, longest
example first: deterministic, and never more rows, nor longer ones, than the padded batch.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from kdcache.errors import ConfigError
from kdcache.train.data import Batch, collate

# What reads padded [batch, time] rows as whole sequences, and why it cannot read packed ones.
UNSUPPORTED_TERMS = {"attention": "builds T x T self-attention relations over each whole row"}
UNSUPPORTED_PSEUDO_TEACHERS = {"augment": "corrupts each row but its first token, so later examples of a packed row lose their first token"}


def plan_rows(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, offset) of each example in rows of at most ``capacity`` tokens: first-fit decreasing (longest first, ties
    in batch order), one numpy scan of the rows' free space per example."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() > capacity:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit a packed row of {capacity}")
    rows = np.empty(len(lengths), dtype=np.int64)
    offsets = np.empty(len(lengths), dtype=np.int64)
    used = np.zeros(len(lengths), dtype=np.int64)  # tokens used per row (at most one row per example)
    open_rows = 0
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(used[:open_rows] + lengths[i] <= capacity)
        r = int(fits[0]) if fits.size else open_rows
        open_rows += r == open_rows
        rows[i], offsets[i] = r, used[r]
        used[r] += lengths[i]
    return rows, offsets


def pack(examples: list[dict], pad_id: int = 0, tail_index: int | None = None, max_length: int | None = None,
         topk_decode: Callable | None = None) -> Batch:
    """The examples packed into rows of at most ``max_length`` tokens (default: the longest example's); the fields
    of ``data.collate``, with segment ids as the attention mask and the examples in row order (module docstring)."""
    lens = np.array([len(ex["input_ids"]) for ex in examples], dtype=np.int64)
    L = int(max_length or lens.max())
    rows, offsets = plan_rows(lens, L)
    order = np.lexsort((offsets, rows))  # row by row, left to right: the order the targets are flattened in
    padded = collate([examples[i] for i in order], pad_id, tail_index, topk_decode)
    lens, rows, offsets = lens[order], rows[order], offsets[order]
    # every real token: from (example e, position t) of the padded batch to (rows[e], offsets[e] + t)
    e = np.repeat(np.arange(len(lens)), lens)
    t = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    src = (torch.from_numpy(e), torch.from_numpy(t))
    dst = (torch.from_numpy(rows[e]), torch.from_numpy(offsets[e] + t))
    R = int(rows.max()) + 1

    def place(x: torch.Tensor, width: int, fill: Any = 0) -> torch.Tensor:
        out = torch.full((R, width, *x.shape[2:]), fill, dtype=x.dtype)
        out[dst] = x[src]
        return out

    segment = torch.from_numpy(np.arange(len(lens)) - np.searchsorted(rows, rows) + 1)  # 1, 2, ... within a row
    ids = place(padded.input_ids, L, pad_id)
    seg = torch.zeros(R, L, dtype=torch.int64)
    seg[dst] = segment[src[0]]
    target = t < lens[e] - 1  # positions that predict a token of their own example
    select = torch.zeros(R, L - 1, dtype=torch.bool)
    select[dst[0][target], dst[1][target]] = padded.select[src[0][target], src[1][target]]
    signals = {k: place(v, L) for k, v in padded.signals.items()}  # [B, T, *] -> [R, L, *], at the tokens' new places
    return Batch(ids, seg, select, padded.targets, padded.num_tokens, padded.teacher_nll_sum, signals, padded.topk_codes)


def position_ids(segments: torch.Tensor) -> torch.Tensor:
    """Per-token positions [R, L] from segment ids: 0 at the start of every run of equal ids (each example, and the
    padding after them), counting up within it. A right-padded 0/1 mask gives 0..n-1 for its example."""
    idx = torch.arange(segments.shape[-1], device=segments.device).expand_as(segments)
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return idx - torch.where(start, idx, torch.zeros_like(idx)).cummax(-1).values


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[R, 1, L, L] bool, True where query i may attend to key j: j <= i in the same example (padding only to itself
    and the padding before it). What transformers builds from :func:`position_ids`; for tests and other students."""
    L = segments.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal)[:, None]


def _packed_call(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of the decoder: a 2-D mask of segment ids becomes restarting position_ids, no mask, no cache."""
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2 or kwargs.get("position_ids") is not None or kwargs.get("past_key_values") is not None:
        return None
    return args, {**kwargs, "attention_mask": None, "position_ids": position_ids(mask), "use_cache": False}


def enable(model: Any) -> None:
    """Let ``model`` read packed batches (a decoder pre-hook, once; a deep copy keeps it), checked on two tiny
    sequences: the second one packed after the first must give what it gives alone. Padded batches read as before."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        raise ConfigError(f"packing needs a decoder-only student ({type(model).__name__} has no get_decoder()); use packing=false")
    if getattr(decoder, "_kdcache_packing", False):
        return
    decoder.register_forward_pre_hook(_packed_call, with_kwargs=True)
    decoder._kdcache_packing = True
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(7, device=device) * 7 + 3) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = decoder(input_ids=ids[None], attention_mask=torch.tensor([[1, 1, 1, 2, 2, 2, 2]], device=device)).last_hidden_state[0, 3:]
            alone = decoder(input_ids=ids[None, 3:], attention_mask=torch.ones(1, 4, dtype=torch.long, device=device)).last_hidden_state[0]
    finally:
        model.train(was_training)
    err = (packed.float() - alone.float()).abs().max().item()
    if not err <= 1e-3 * max(1.0, alone.float().abs().max().item()):
        raise ConfigError(f"the student ({type(model).__name__}, attention {getattr(model.config, '_attn_implementation', '?')}) does not "
                          f"keep packed examples apart (a packed example's hidden states differ by {err:.3g} from the example alone); "
                          "use packing=false")


def refuse_unsupported(cfg: Any) -> None:
    """One line naming the fix for a run that cannot be packed (the terms of every stage, the pseudo-teacher)."""
    terms = {name for section in (cfg.terms, *(st.terms for st in cfg.stages if st.terms is not None)) for name in (section or {})}
    bad = sorted(terms & UNSUPPORTED_TERMS.keys())
    if bad:
        raise ConfigError(f"packing=true cannot be used with terms.{bad[0]}: it {UNSUPPORTED_TERMS[bad[0]]}; use packing=false or drop terms.{bad[0]}")
    if cfg.pseudo_teacher in UNSUPPORTED_PSEUDO_TEACHERS:
        raise ConfigError(f"packing=true cannot be used with pseudo_teacher {cfg.pseudo_teacher}: it {UNSUPPORTED_PSEUDO_TEACHERS[cfg.pseudo_teacher]}; "
                          "use packing=false or another pseudo_teacher")
