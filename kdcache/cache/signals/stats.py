"""``stats``: per-example teacher NLL, entropy and the number of loss-mask targets (every cache has it)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from kdcache.cache.signals.base import Rows, Signal, column
from kdcache.cache.signals.registry import register

STATS_COLUMNS = ("teacher_nll", "teacher_entropy", "num_loss_tokens")


class Stats(Signal):
    name = "stats"
    schema_rank = 30

    def entry(self, s: Mapping) -> dict:
        return {"columns": {c: column([], "int32" if c == "num_loss_tokens" else "float32", None) for c in STATS_COLUMNS}}

    def check_rows(self, entry: Mapping, rows: Rows) -> None:
        if "num_loss_tokens" in rows.values and "loss_mask" in rows.values:
            o = rows.offsets["loss_mask"]
            cs = np.concatenate([[0], np.cumsum(rows.values["loss_mask"].astype(np.int64))])
            rows.bad_row(cs[o[1:]] - cs[o[:-1]] != rows.values["num_loss_tokens"], "num_loss_tokens differs from the loss mask")


register(Stats())
