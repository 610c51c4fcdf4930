"""``hidden``: hidden states after chosen layers, optionally projected (``h @ P``) and at a subset of positions
(kdcache/cache/hidden.py defines both). Settings: ``layers``, ``size`` (the teacher's width), ``codec``,
``project_dim``, ``project_seed``, ``positions``, ``positions_seed``. With positions other than all, the stored
positions travel in ``hidden_positions``, which the reader reads along with any hidden column."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from kdcache.cache.hidden import parse_positions
from kdcache.cache.signals.base import Rows, Signal, coded_columns, column
from kdcache.cache.signals.registry import register

HIDDEN_POSITIONS_COLUMN = "hidden_positions"


def hidden_column(layer: int) -> str:
    return f"hidden_{layer}"


class Hidden(Signal):
    name = "hidden"
    schema_rank = 40

    def entry(self, s: Mapping) -> dict:
        positions = s.get("positions", "all")
        kind, _ = parse_positions(positions)
        project_dim = s.get("project_dim", 0)
        width = project_dim or s["size"]
        rows = "T" if kind == "all" else "P"
        columns: dict = {}
        if kind != "all":
            columns[HIDDEN_POSITIONS_COLUMN] = column(["P"], "int32")
        for layer in s["layers"]:
            columns.update(coded_columns(hidden_column(layer), rows, width, s.get("codec", "fp16")))
        entry: dict = {"layers": list(s["layers"]), "size": width}
        if project_dim:
            entry.update(
                width=s["size"], project_dim=project_dim, project_seed=s.get("project_seed", 0),
                projection="h @ P, P = kdcache.cache.hidden.orthogonal_projection(width, project_dim, project_seed)",
            )
        if kind != "all":
            entry["positions"] = positions
            if kind == "fraction":
                entry["positions_seed"] = s.get("positions_seed", 0)
        entry["columns"] = columns
        return entry

    def companions(self, entry: Mapping) -> dict[str, list[str]]:
        cols = entry.get("columns", {})
        if HIDDEN_POSITIONS_COLUMN not in cols:
            return {}
        return {name: [HIDDEN_POSITIONS_COLUMN] for name in cols if name != HIDDEN_POSITIONS_COLUMN}

    def dims(self, entry: Mapping, rows: Rows) -> dict:
        if HIDDEN_POSITIONS_COLUMN not in rows.lengths:
            return {}
        P = rows.lengths[HIDDEN_POSITIONS_COLUMN]
        pos = rows.values[HIDDEN_POSITIONS_COLUMN].astype(np.int64)
        starts = rows.offsets[HIDDEN_POSITIONS_COLUMN][:-1]
        row_of = np.repeat(np.arange(rows.n), P)
        first = np.zeros(pos.size, dtype=bool)
        first[starts[P > 0]] = True
        bad = (pos < 0) | (pos >= np.repeat(rows.T, P)) | (~first & (np.diff(pos, prepend=-1) <= 0))
        rows.bad_row(np.isin(np.arange(rows.n), row_of[bad]), "hidden_positions outside [0, T) or not strictly ascending")
        return {"P": P}


register(Hidden())
