"""Cache examples to padded tensors: one micro-batch at a time, straight from the streaming reader."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from kdcache.cache import Cache, holdout_fraction_filter
from kdcache.cache.topk_storage import LOGICAL as TOPK_LOGICAL, storage_of, stream_column
from kdcache.train.losses import Targets

# What every run reads: tokens, masks and the per-example statistics; teacher signals only as a loss needs them.
BASE_COLUMNS = ("example_id", "input_ids", "loss_mask", "teacher_nll", "num_loss_tokens")
# What evaluation reads besides: the top-k, for KD loss and top-1 agreement against the cached teacher.
EVAL_SIGNALS = ("topk_ids", "topk_logprobs", "tail_logprob")
TEMPERED_TAIL = "tail_logprob_tempered"


def train_columns(cache: Cache, signals: Iterable[str], topk_codes: bool = False) -> list[str]:
    """The base columns plus ``signals`` that the cache has: a CE run never decodes the top-k (most of the bytes).
    ``topk_codes``: a coded cache's top-k comes as its codes, for :meth:`Batch.to` to decode on the device."""
    columns = [c for c in (*BASE_COLUMNS, *signals) if c in cache.columns]
    if topk_codes and cache.topk_code_columns and any(c in TOPK_LOGICAL for c in columns):
        columns = [c for c in columns if c not in TOPK_LOGICAL] + cache.topk_code_columns
    return columns


@dataclass
class TopKCodes:
    """A batch's top-k as a coded cache stores it (one uint8 [N, width] tensor per stream, the selected targets'
    rows), decoded on the device by :meth:`Batch.to` (``decode``: the cache's top-k storage)."""

    streams: dict[str, torch.Tensor]
    decode: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.decode({k: v.to(device, non_blocking=True) for k, v in self.streams.items()})

    def pin_memory(self) -> TopKCodes:
        return TopKCodes({k: v.pin_memory() for k, v in self.streams.items()}, self.decode)


def topk_decoder(cache: Cache) -> Callable[[dict[str, torch.Tensor]], tuple]:
    """The cache's device decoder of top-k codes (``storage.decode_tensors`` with its params)."""
    storage, params = storage_of(cache.manifest.signals)
    return lambda streams: storage.decode_tensors(streams, params)


def tempered_tail_index(cache: Cache, temperature: float) -> int | None:
    """Which stored tempered-tail column holds ``temperature`` (None: the cache has none for it)."""
    temps = cache.manifest.tail_temperatures
    hits = [i for i, t in enumerate(temps) if abs(t - temperature) <= 1e-9 * max(1.0, abs(t))]
    return hits[0] if hits and TEMPERED_TAIL in cache.columns else None


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    select: torch.Tensor  # [B, T-1] bool: targets that count
    targets: Targets  # per selected target, flattened in (batch, time) order
    num_tokens: int  # selected targets
    teacher_nll_sum: float  # sum over selected targets, from the cache's per-example stats
    # Per-position teacher signals for loss terms, padded [B, T, *]: hidden_<L> (with hidden_mask [B, T], the
    # positions whose state is stored) and qkv_<L>.
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    # The top-k still coded (train_columns(topk_codes=True)); targets.topk_* are None until Batch.to decodes them.
    topk_codes: TopKCodes | None = None

    def to(self, device: torch.device) -> Batch:
        """On ``device``, ready for the losses: int32 ids become int64 and fp16 values float32 there, after the copy
        (the host keeps the cache's narrow dtypes: half the bytes to move, no host-side cast); coded top-k rows are
        decoded there."""
        t = self.targets
        moved = replace(t, **{f.name: _widen(getattr(t, f.name).to(device, non_blocking=True))
                              for f in fields(t) if getattr(t, f.name) is not None})
        if self.topk_codes is not None:
            ids, logprobs, tail = self.topk_codes.to(device)
            moved = replace(moved, topk_ids=ids, topk_logprobs=logprobs, tail_logprob=tail)
        return Batch(self.input_ids.to(device, non_blocking=True), self.attention_mask.to(device, non_blocking=True),
                     self.select.to(device, non_blocking=True), moved, self.num_tokens,
                     self.teacher_nll_sum, {k: v.to(device, non_blocking=True) for k, v in self.signals.items()})

    def pin_memory(self) -> Batch:
        """The same batch in page-locked host memory, so that ``to(cuda)`` copies asynchronously."""
        t = self.targets
        return Batch(self.input_ids.pin_memory(), self.attention_mask.pin_memory(), self.select.pin_memory(),
                     replace(t, **{f.name: getattr(t, f.name).pin_memory() for f in fields(t) if getattr(t, f.name) is not None}),
                     self.num_tokens, self.teacher_nll_sum, {k: v.pin_memory() for k, v in self.signals.items()},
                     self.topk_codes.pin_memory() if self.topk_codes is not None else None)


def _widen(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.int32:
        return x.long()
    return x.float() if x.is_floating_point() else x


def collate(examples: list[dict], pad_id: int = 0, tail_index: int | None = None,
            topk_decode: Callable[[dict[str, torch.Tensor]], tuple] | None = None) -> Batch:
    """Right-pad to the longest example. Teacher rows are gathered with one boolean index per example;
    ``tail_index`` picks the stored tempered tail of the run's temperature; examples holding top-k codes need
    ``topk_decode`` (:func:`topk_decoder`), which :meth:`Batch.to` runs on the device."""
    lens = np.array([len(ex["input_ids"]) for ex in examples])
    B, T = len(examples), int(lens.max())
    ids = np.full((B, T), pad_id, dtype=np.int64)
    select = np.zeros((B, T - 1), dtype=bool)
    for i, ex in enumerate(examples):
        ids[i, : lens[i]] = ex["input_ids"]
        select[i, : lens[i] - 1] = ex["loss_mask"]
    attention = (np.arange(T)[None, :] < lens[:, None]).astype(np.int64)
    labels = ids[:, 1:][select]
    topk_ids = topk_lp = tail = tail_t = codes = None
    code_columns = [c for c in examples[0] if c.startswith(stream_column(""))]
    if "topk_ids" in examples[0] or code_columns:
        rows = [_selector(ex["loss_mask"]) for ex in examples]

        def gather(name: str) -> np.ndarray:
            return np.concatenate([ex[name][r] for ex, r in zip(examples, rows)])

        if code_columns:
            if topk_decode is None:
                raise ValueError("the examples hold top-k codes; pass topk_decode=data.topk_decoder(cache)")
            codes = TopKCodes({c: torch.from_numpy(gather(c)) for c in code_columns}, topk_decode)
        else:
            topk_ids = torch.from_numpy(gather("topk_ids"))  # int32 / fp16 as stored: Batch.to widens them on the device
            topk_lp = torch.from_numpy(gather("topk_logprobs"))
            tail = torch.from_numpy(gather("tail_logprob"))
        if tail_index is not None:
            tail_t = torch.from_numpy(np.ascontiguousarray(gather(TEMPERED_TAIL)[:, tail_index])).float()
    s_ids = s_w = None
    if "sampled_ids" in examples[0]:
        s_ids, s_w = _sampled_targets(examples, [ex["loss_mask"] for ex in examples])
    # (a row without loss tokens has teacher_nll NaN and adds nothing)
    nll = sum(float(ex.get("teacher_nll", 0.0)) * n for ex in examples if (n := int(ex.get("num_loss_tokens", 0))))
    return Batch(
        torch.from_numpy(ids),
        torch.from_numpy(attention),
        torch.from_numpy(select),
        Targets(torch.from_numpy(labels), topk_ids, topk_lp, tail, s_ids, s_w, tail_t),
        int(select.sum()),
        nll,
        _position_signals(examples, lens, T),
        codes,
    )


def _selector(mask: np.ndarray) -> slice | np.ndarray:
    """The rows a loss mask keeps: a slice when they are one run (a masked prompt, then the response: the usual
    case), so gathering them is one view per example and one copy per batch; else their indices."""
    kept = np.flatnonzero(mask)
    if len(kept) == 0:
        return slice(0, 0)
    return slice(int(kept[0]), int(kept[-1]) + 1) if kept[-1] - kept[0] + 1 == len(kept) else kept


_HIDDEN = re.compile(r"hidden_\d+")
_QKV = re.compile(r"qkv_\d+")


def _position_signals(examples: list[dict], lens: np.ndarray, T: int) -> dict[str, torch.Tensor]:
    """Hidden states and q/k/v rows placed at their positions in [B, T, *] (one fancy-index write per column).
    A cache that stores a subset of positions lists them (``hidden_positions``); ``hidden_mask`` marks them."""
    out: dict[str, torch.Tensor] = {}
    first = examples[0]
    hidden = [c for c in first if _HIDDEN.fullmatch(c)]
    if hidden:
        pos = [np.asarray(ex["hidden_positions"], dtype=np.int64) if "hidden_positions" in ex else np.arange(len(ex[hidden[0]]))
               for ex in examples]
        rows = np.repeat(np.arange(len(examples)), [len(p) for p in pos])
        cols = np.concatenate(pos)
        mask = np.zeros((len(examples), T), dtype=bool)
        mask[rows, cols] = True
        out["hidden_mask"] = torch.from_numpy(mask)
        for c in hidden:
            values = np.concatenate([ex[c] for ex in examples])
            dense = np.zeros((len(examples), T, values.shape[-1]), dtype=np.float32)
            dense[rows, cols] = values
            out[c] = torch.from_numpy(dense)
    qkv = [c for c in first if _QKV.fullmatch(c)]
    if qkv:  # every position of every example, the same for all blocks
        rows = np.repeat(np.arange(len(examples)), lens)
        cols = np.concatenate([np.arange(n) for n in lens])
    for c in qkv:
        values = np.concatenate([ex[c] for ex in examples])
        dense = np.zeros((len(examples), T, values.shape[-1]), dtype=np.float32)
        dense[rows, cols] = values
        out[c] = torch.from_numpy(dense)
    return out


def _sampled_targets(examples: list[dict], masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length draws per position -> padded [selected positions, max distinct] ids and weights
    (padding has weight 0, so it adds nothing to the loss or its gradient). Vectorised per batch."""
    sizes = np.concatenate([ex["sampled_sizes"] for ex in examples]).astype(np.int64)
    ids = np.concatenate([ex["sampled_ids"] for ex in examples])
    weights = np.concatenate([ex["sampled_weights"] for ex in examples]).astype(np.float32)
    keep_pos = np.concatenate(masks)
    entry_pos = np.repeat(np.arange(len(sizes)), sizes)
    keep = keep_pos[entry_pos]
    rank = np.cumsum(keep_pos) - 1  # row of each kept position in the output
    slot = np.arange(len(ids)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    width = int(sizes[keep_pos].max()) if keep_pos.any() else 1
    out_ids = np.zeros((int(keep_pos.sum()), max(width, 1)), dtype=np.int64)
    out_w = np.zeros(out_ids.shape, dtype=np.float32)
    rows, cols = rank[entry_pos[keep]], slot[keep]
    out_ids[rows, cols] = ids[keep]
    out_w[rows, cols] = weights[keep]
    return torch.from_numpy(out_ids), torch.from_numpy(out_w)


def batches(stream: Iterable[dict], batch_size: int, pad_id: int = 0, tail_index: int | None = None,
            collate_fn: Callable[[list[dict], int, int | None], Batch] = collate) -> Iterator[Batch]:
    """Consecutive micro-batches of the stream's examples (a curriculum may filter them on the way); the stream's state
    after a batch marks exactly where the next begins. ``collate_fn``: padded rows, or packed ones (kdcache.train.packing)."""
    buf: list[dict] = []
    for ex in stream:
        buf.append(ex)
        if len(buf) == batch_size:
            yield collate_fn(buf, pad_id, tail_index)
            buf = []
    if buf:
        yield collate_fn(buf, pad_id, tail_index)


def heldout_batches(cache: Cache, fraction: float, max_examples: int, batch_size: int, pad_id: int = 0) -> list[Batch]:
    """The first ``max_examples`` held-out examples (stable split by example_id), collated once, kept in memory.

    ``fraction=0`` evaluates on every row from the start of the cache.
    """
    keep = holdout_fraction_filter(fraction) if fraction > 0 else None
    examples: list[dict] = []
    for ex in cache.stream(columns=train_columns(cache, EVAL_SIGNALS), keep=keep):
        examples.append(ex)
        if len(examples) >= max_examples:
            break
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]
