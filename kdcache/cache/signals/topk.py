"""``topk``: the teacher's k most likely next tokens per target position, their log-probs and the tail mass.

Settings: ``k``, ``vocab_size``, ``logprob_codec``, ``tail_temperatures``, ``codec`` (a top-k storage of
kdcache/cache/topk_storage.py) and ``codec_options``. A coded storage (sqrt-delta) is a stream group: its byte planes
decode together into the logical ``topk_ids``/``topk_logprobs``/``tail_logprob``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from kdcache.cache.codecs import get_codec
from kdcache.cache.signals.base import RowProblem, Rows, Signal, StreamGroup, column
from kdcache.cache.signals.registry import register
from kdcache.cache.topk_storage import LOGICAL, get_storage, storage_of

TOPK_COLUMNS = LOGICAL
TEMPERED_TAIL_COLUMN = "tail_logprob_tempered"


class TopK(Signal):
    name = "topk"
    schema_rank = 10

    def entry(self, s: Mapping) -> dict:
        lp = get_codec(s.get("logprob_codec", "fp16"))
        storage = get_storage(s.get("codec", "lists"))
        k, tails = int(s["k"]), list(s.get("tail_temperatures") or ())
        params = storage.params(k, s["vocab_size"], s.get("codec_options") or {})
        entry = {
            "k": k,
            "vocab_size": s["vocab_size"],
            # (absent: lists, so a cache made before storages existed has the same signals)
            **({"storage": {"name": storage.name, "params": params, "logical_columns": list(LOGICAL)}}
               if storage.name != "lists" else {}),
            "columns": storage.columns(k, params, lp),
            # How a trainer gets the teacher's tail bucket at temperature T != 1: exactly from the stored column
            # for these T, else by tempering the k+1 buckets (tail treated as one token on both sides).
            "tail_temperatures": [float(t) for t in tails],
            "tail_at_other_temperatures": "bucket_tempered",
        }
        if tails:
            entry["columns"][TEMPERED_TAIL_COLUMN] = column(["T-1", len(tails)], "float32")
        return entry

    def format_version(self, entry: Mapping) -> int:
        return storage_of({"topk": entry})[0].format_version

    def second_dims(self, entry: Mapping) -> dict[str, int]:
        return {**super().second_dims(entry), "topk_ids": int(entry["k"]), "topk_logprobs": int(entry["k"])}

    def stream_group(self, entry: Mapping) -> StreamGroup | None:
        storage, params = storage_of({"topk": entry})
        if storage.name == "lists":
            return None
        streams = [c for c in entry["columns"] if c.startswith("topk.")]
        return StreamGroup(
            columns=streams, logical=list(LOGICAL),
            encode=lambda examples: storage.encode(examples, params),
            decode=lambda blobs, order: storage.decode(blobs, params, order=order),
            positions=lambda blobs: storage.positions(blobs, params),
        )

    def check_rows(self, entry: Mapping, rows: Rows) -> None:
        group = self.stream_group(entry)
        streams = {c: rows.offsets[c] for c in (group.columns if group else []) if c in rows.offsets}
        if streams:  # the codes decode (ids inside the vocabulary, masses that add up)
            blobs = {}
            for c, o in streams.items():
                data = np.frombuffer(rows.table.column(c).combine_chunks().buffers()[2] or b"", dtype=np.uint8)
                blobs[c] = (o - o[0], data[o[0]: o[-1]])
            try:
                group.decode(blobs, "rank")
            except (ValueError, KeyError) as exc:
                raise RowProblem(f"top-k streams do not decode: {exc}") from None
        rows.check_vocab("topk_ids", entry.get("vocab_size"))


register(TopK())
