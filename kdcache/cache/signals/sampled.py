"""``sampled`` (RS-KD): unique tokens drawn from the teacher per position with their importance weights.

Settings: ``draws``, ``proposal_temperature``, ``vocab_size``, ``logprob_codec`` (the weights' codec)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from kdcache.cache.codecs import get_codec
from kdcache.cache.signals.base import Rows, Signal, column
from kdcache.cache.signals.registry import register

SAMPLED_COLUMNS = ("sampled_ids", "sampled_weights", "sampled_sizes")


class Sampled(Signal):
    name = "sampled"
    schema_rank = 20

    def entry(self, s: Mapping) -> dict:
        lp = get_codec(s.get("logprob_codec", "fp16"))
        return {
            "draws": s["draws"],
            "proposal_temperature": s.get("proposal_temperature", 1.0),
            "vocab_size": s["vocab_size"],
            "columns": {
                "sampled_ids": column(["sum(sizes)"], "int32"),
                "sampled_weights": column(["sum(sizes)"], str(lp.arrow_type), lp.name),
                "sampled_sizes": column(["T-1"], "uint16"),
            },
        }

    def dims(self, entry: Mapping, rows: Rows) -> dict:
        if "sampled_sizes" not in rows.values:
            return {}
        cs = np.concatenate([[0], np.cumsum(rows.values["sampled_sizes"].astype(np.int64))])
        o = rows.offsets["sampled_sizes"]
        return {"sum(sizes)": cs[o[1:]] - cs[o[:-1]]}

    def check_rows(self, entry: Mapping, rows: Rows) -> None:
        rows.check_vocab("sampled_ids", entry.get("vocab_size"))


register(Sampled())
