"""Ensemble targets without any teacher: a weighted mixture of several top-k caches of the same examples.

Each source gives, per position, probabilities for its own top-k plus a tail mass. The mixture's mass on a
token is the weighted sum over the sources that kept it; what a source did not keep stays in its tail,
so the mixture's buckets still sum to one and nothing is invented about tokens a teacher did not rank.
The new top-k is the mixture's k most likely tokens of the union; the rest joins the tail. Merging is
vectorised per example (unique over row*V + id, then one lexsort), and the output is written through
the ordinary writer, so it streams, resumes and is a cache like any other.

Per-example statistics are the weighted means of the sources' (an upper bound of the mixture's NLL and a
lower bound of its entropy, by convexity); hidden states are not combined.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from kdcache.cache.filesystem import as_path
from kdcache.cache.manifest import Manifest, require_same_tokenizer
from kdcache.cache.reader import open_cache
from kdcache.cache.schema import GENERATION_COLUMNS, make_signals
from kdcache.cache.writer import CacheWriter, install_tokenizer
from kdcache.errors import CacheMismatchError, ConfigError

log = logging.getLogger(__name__)

_READ = ["example_id", "input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logprob", "teacher_nll", "teacher_entropy", "num_loss_tokens"]


def mix_topk(ids: list[np.ndarray], logprobs: list[np.ndarray], tails: list[np.ndarray], weights: np.ndarray, top_k: int, vocab: int):
    """Mixture over one example's positions: ([P, top_k] ids, [P, top_k] logprobs, [P] tail logprob)."""
    P = ids[0].shape[0]
    rows = np.concatenate([np.repeat(np.arange(P), a.shape[1]) for a in ids])
    keys = rows.astype(np.int64) * vocab + np.concatenate([a.reshape(-1) for a in ids]).astype(np.int64)
    probs = np.concatenate([w * np.exp(lp.astype(np.float64)).reshape(-1) for w, lp in zip(weights, logprobs)])
    uniq, inverse = np.unique(keys, return_inverse=True)
    mass = np.bincount(inverse, weights=probs, minlength=len(uniq))
    u_rows, u_ids = uniq // vocab, uniq % vocab
    order = np.lexsort((-mass, u_rows))  # by row, most likely first
    starts = np.searchsorted(u_rows[order], np.arange(P))
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.append(starts, len(order))))
    pick = order[rank < top_k]
    out_ids = u_ids[pick].reshape(P, top_k).astype(np.int32)
    out_p = mass[pick].reshape(P, top_k)
    tail = 1.0 - out_p.sum(-1)
    # A tail exists where some source had one, or where the union held more than top_k tokens.
    has_tail = np.any([np.isfinite(t) for t in tails], axis=0) | (np.bincount(u_rows, minlength=P) > top_k)
    tail_lp = np.where(has_tail, np.log(np.clip(tail, 1e-10, None)), -np.inf)
    return out_ids, np.log(np.clip(out_p, 1e-38, None)).astype(np.float32), tail_lp.astype(np.float32)


def combine_caches(sources: list[str | Path], weights: list[float], out: str | Path, top_k: int | None = None,
                   logprob_codec: str = "fp16", overwrite: bool = False, codec: str = "lists",
                   codec_options: dict | None = None) -> Manifest:
    """Write the weighted mixture of ``sources`` (same tokenizer, same examples) as a new cache at ``out``."""
    if len(sources) < 2:
        raise ConfigError("an ensemble needs at least two caches")
    if len(weights) != len(sources):
        raise ConfigError(f"{len(sources)} caches but {len(weights)} weights; give one weight per cache")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfigError(f"ensemble weights must be non-negative and sum to a positive number, got {list(weights)}")
    w = w / w.sum()
    for s in sources:
        if as_path(s).resolve() == as_path(out).resolve():
            raise ConfigError(f"the output {out} is also one of the caches to combine; choose another --out")
    caches = [open_cache(s) for s in sources]
    first = caches[0].manifest
    for c in caches:
        m = c.manifest
        if "topk" not in m.signals:
            raise ConfigError(f"cache {c.path} has no top-k signal to combine; regenerate it with `kdcache generate --top-k K`")
        if m.status != "complete":
            raise ConfigError(f"cache {c.path} is incomplete; finish it (rerun its generate command) before combining")
        require_same_tokenizer(first, m, str(caches[0].path), str(c.path), "an ensemble")
        if m.num_rows != first.num_rows:
            raise CacheMismatchError(f"caches {caches[0].path} ({first.num_rows} rows) and {c.path} ({m.num_rows} rows) hold different examples; "
                                     "generate them from the same dataset settings")
    k_max = max(c.manifest.top_k for c in caches)
    top_k = top_k or k_max
    if not 1 <= top_k <= k_max:
        raise ConfigError(f"top_k {top_k} must be between 1 and the largest source k ({k_max})")
    vocab = first.vocab_size
    gen_cols = [c for c in GENERATION_COLUMNS if all(c in x.columns for x in caches)]
    settings = {
        "ensemble": [{"path": str(c.path), "weight": float(wi), "teacher": c.manifest.teacher, "settings_hash": c.manifest.settings_hash}
                     for c, wi in zip(caches, w)],
        "tokenizer": first.tokenizer,
        "dataset": first.settings.get("dataset", {}),
        "scoring": {"top_k": top_k, "logprob_codec": logprob_codec, "entropy": "weighted_mean_of_sources",
                    **({"codec": codec, "codec_options": dict(codec_options or {})} if codec != "lists" or codec_options else {})},
    }
    signals = make_signals(top_k, vocab, logprob_codec, generation=bool(gen_cols), topk_codec=codec, topk_codec_options=codec_options)
    out = as_path(out)
    writer = CacheWriter(out, settings, signals, overwrite=overwrite, created_by="kdcache combine")
    if writer.complete:
        return writer.manifest
    try:
        source_tokenizer = caches[0].tokenizer_dir
        if source_tokenizer is not None:
            install_tokenizer(out, lambda tmp: shutil.copytree(source_tokenizer, tmp))
        start = writer.resume_input_row
        streams = [iter(c.stream(columns=_READ + gen_cols)) for c in caches]
        for index, exs in enumerate(zip(*streams)):
            if index < start:
                continue
            ref = exs[0]
            for ex, c in zip(exs[1:], caches[1:]):
                if ex["example_id"] != ref["example_id"] or not np.array_equal(ex["input_ids"], ref["input_ids"]):
                    raise CacheMismatchError(
                        f"caches {caches[0].path} and {c.path} differ at row {index} ({ref['example_id']!r} vs {ex['example_id']!r}); "
                        "generate them from the same dataset settings"
                    )
            ids, lps, tail = mix_topk([e["topk_ids"] for e in exs], [e["topk_logprobs"] for e in exs], [e["tail_logprob"] for e in exs], w, top_k, vocab)
            row = {
                "example_id": ref["example_id"], "input_ids": ref["input_ids"], "loss_mask": ref["loss_mask"],
                "topk_ids": ids, "topk_logprobs": lps, "tail_logprob": tail,
                "teacher_nll": float(sum(wi * e["teacher_nll"] for wi, e in zip(w, exs))),
                "teacher_entropy": float(sum(wi * e["teacher_entropy"] for wi, e in zip(w, exs))),
                "num_loss_tokens": ref["num_loss_tokens"],
                **{col: ref[col] for col in gen_cols},
            }
            writer.add_row([row], index + 1)
    except BaseException:
        # Nothing committed in a directory this run created: leave no half-made cache behind (as generate does).
        writer.abort(discard_new=True)
        raise
    return writer.close()
