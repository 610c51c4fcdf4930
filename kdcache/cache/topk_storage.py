"""How the top-k signal is laid out in Parquet: a registry of storages, each mapping the three logical columns
(``topk_ids`` [T-1, k], ``topk_logprobs`` [T-1, k], ``tail_logprob`` [T-1]) to Arrow columns and back.

Readers and trainers only ever see the logical columns; the manifest's ``signals.topk.storage`` names the storage
and holds every parameter its decoder needs, so a cache written with one storage reads anywhere. Two ship:

- ``lists`` (cache format 1): ``list<int32>`` ids in rank order, ``list<value codec>`` log-probs (``logprob_codec``:
  fp16 by default) and ``list<float32>`` tails. Plain Parquet lists any tool reads; 236 B/token at k=64.
- ``sqrt-delta`` (cache format 2): kdcache/cache/topk_codec.py, ids as sorted gaps and values on a grid uniform in
  sqrt(p) chosen by a KL target, one binary blob per example per byte plane (columns ``topk.<stream>``). 114 B/token
  at k=64 with a codec KL of 9e-5 nats on SmolLM2 (docs/benchmarks.md); ``kdcache export`` writes lists again.

Add a storage with a class below and one ``STORAGES`` entry; its options (``generate --set codec_options=...``) go
to its own ``params``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

import kdcache.cache.topk_codec as topk_codec
from kdcache.errors import ConfigError

LOGICAL = ("topk_ids", "topk_logprobs", "tail_logprob")


class ListsStorage:
    """Format 1: the logical columns are the physical ones (the writer's and reader's generic list path)."""

    name = "lists"
    format_version = 1

    def params(self, k: int, vocab_size: int, options: Mapping[str, Any]) -> dict:
        if options:
            raise ConfigError(f"the lists top-k codec takes no codec_options (got {sorted(options)}); the value codec is --set logprob_codec=fp16|fp32|bf16")
        return {}

    def columns(self, k: int, params: Mapping, value_codec: Any) -> dict:
        return {
            "topk_ids": {"shape": ["T-1", k], "dtype": "int32", "codec": "plain"},
            "topk_logprobs": {"shape": ["T-1", k], "dtype": str(value_codec.arrow_type), "codec": value_codec.name},
            "tail_logprob": {"shape": ["T-1"], "dtype": "float32", "codec": "plain"},
        }


class SqrtDeltaStorage:
    """Format 2: kdcache/cache/topk_codec.py's byte-plane streams, one binary column each."""

    name = "sqrt-delta"
    format_version = 2

    def params(self, k: int, vocab_size: int, options: Mapping[str, Any]) -> dict:
        unknown = sorted(set(options) - {"kl", "step"})
        if unknown:
            raise ConfigError(f"unknown codec_options {unknown} for the sqrt-delta codec; it takes kl (target mean KL, "
                              f"default {topk_codec.DEFAULT_KL}) or step (grid step in sqrt(p))")
        try:
            return topk_codec.make_params(k, vocab_size, kl=float(options.get("kl", topk_codec.DEFAULT_KL)),
                                          step=None if options.get("step") is None else float(options["step"]))
        except ValueError as exc:
            raise ConfigError(f"sqrt-delta codec_options: {exc}") from None

    def columns(self, k: int, params: Mapping, value_codec: Any) -> dict:
        return {stream_column(s): {"shape": ["T-1", w], "dtype": "binary", "layout": "binary", "stream_of": "topk"}
                for s, w in topk_codec.stream_widths(params).items()}

    def encode(self, examples: Sequence[Mapping[str, Any]], params: Mapping) -> dict[str, pa.Array]:
        """All examples of a row group in one call: binary columns, one blob per example per stream."""
        k = int(params["k"])
        lengths = np.fromiter((len(ex["tail_logprob"]) for ex in examples), dtype=np.int64, count=len(examples))
        ids = _concat([np.asarray(ex["topk_ids"]).reshape(-1, k) for ex in examples], (0, k), np.int64)
        lps = _concat([np.asarray(ex["topk_logprobs"], dtype=np.float32).reshape(-1, k) for ex in examples], (0, k), np.float32)
        tails = _concat([np.asarray(ex["tail_logprob"], dtype=np.float32).reshape(-1) for ex in examples], (0,), np.float32)
        out = {}
        for stream, (data, offsets) in topk_codec.encode_many(ids, lps, tails, lengths, params).items():
            if offsets[-1] >= 2**31:
                raise ValueError(f"a row group's {stream} stream holds {offsets[-1]} bytes (over 2^31); lower row_group_tokens")
            out[stream_column(stream)] = pa.Array.from_buffers(
                pa.binary(), len(examples), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(np.ascontiguousarray(data))])
        return out

    def positions(self, blobs: Mapping[str, tuple[np.ndarray, np.ndarray]], params: Mapping) -> np.ndarray:
        """Position offsets per example of {column: (byte offsets per example, bytes)}, after checking that every
        stream holds the same positions."""
        widths = topk_codec.stream_widths(params)
        first = next(iter(widths))
        positions = blobs[stream_column(first)][0] // widths[first]
        for stream, w in widths.items():
            if not np.array_equal(blobs[stream_column(stream)][0], positions * w):
                raise ValueError(f"stream {stream} holds other positions per example than {first}")
        return positions

    def decode_tensors(self, columns: Mapping[str, Any], params: Mapping) -> tuple:
        """{stream column: uint8 tensor [N, width]} on any torch device -> (ids int64, logprobs, tail) there, ids in
        ascending order (kdcache/cache/topk_codec_device.py): the trainer's decode after the copy to its device."""
        import kdcache.cache.topk_codec_device as topk_codec_device

        return topk_codec_device.decode({s: columns[stream_column(s)] for s in topk_codec.stream_widths(params)}, params)

    def decode(self, blobs: Mapping[str, tuple[np.ndarray, np.ndarray]], params: Mapping, order: str = "rank") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{column: (byte offsets per example, bytes)} -> the logical columns as (offsets, flat values); ``order`` rank
        (most likely first) or id (ascending ids, no sort: the cheapest)."""
        widths = topk_codec.stream_widths(params)
        positions = self.positions(blobs, params)
        ids, lps, tail = topk_codec.decode({s: blobs[stream_column(s)][1] for s in widths}, params, order=order)
        k = int(params["k"])
        return {"topk_ids": (positions * k, ids.reshape(-1)), "topk_logprobs": (positions * k, lps.reshape(-1)),
                "tail_logprob": (positions, tail)}


def _concat(parts: list[np.ndarray], empty: tuple, dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty, dtype=dtype)


def stream_column(stream: str) -> str:
    return f"topk.{stream}"


STORAGES: dict[str, Any] = {s.name: s for s in (ListsStorage(), SqrtDeltaStorage())}


def get_storage(name: str):
    try:
        return STORAGES[name]
    except KeyError:
        raise ConfigError(f"unknown top-k codec {name!r}; valid: {', '.join(sorted(STORAGES))}") from None


def storage_of(signals: Mapping) -> tuple[Any, dict]:
    """The storage and its params of a cache's top-k signal (caches written before storages existed: lists)."""
    spec = (signals.get("topk") or {}).get("storage") or {"name": "lists"}
    return get_storage(spec["name"]), dict(spec.get("params") or {})

