"""Any cache as plain Parquet lists, for tools that want arrays and know nothing of kdcache's codecs.

Each shard becomes one Parquet file of the same row groups, every column decoded: ``topk_ids`` list<int32>
(most likely first), ``topk_logprobs`` and ``tail_logprob`` list<float32>, hidden states and q/k/v
list<float32> (row-major [positions, width], as in the schema), scalars as they are. ``_export.json`` says
where the rows come from and each 2-D column's width. Streams a row group at a time (bounded memory), and
writes into a new or empty folder only, each file under a temporary name renamed when complete, the
description last: an interrupted export is rerun from scratch, and nothing it did not write is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.cache.filesystem import is_remote
from kdcache.cache.manifest import shard_name, write_atomic
from kdcache.cache.reader import open_cache
from kdcache.errors import ConfigError

DESCRIPTION = "_export.json"


def export_cache(src: str | Path, out: str | Path) -> Path:
    if is_remote(out):
        raise ConfigError(f"kdcache export writes a local folder, not {out}; export locally (the source may be on an object store)")
    cache = open_cache(src)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; export into a new folder (nothing there is replaced)")
    out.mkdir(parents=True, exist_ok=True)
    widths: dict[str, int] = {}
    group = 0
    for shard_index, shard in enumerate(cache.manifest.shards):
        path = out / shard_name(shard_index)
        tmp = out / f".{path.name}.tmp"
        writer = None
        try:
            for _ in shard.row_groups:
                block = cache.read_block(group)
                group += 1
                table = _plain_table(block, widths)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table, row_group_size=table.num_rows)
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    description = {"source": str(src) if is_remote(src) else str(Path(src).resolve()), "settings_hash": cache.manifest.settings_hash, "rows": cache.manifest.num_rows,
                   "widths": widths, "layout": "one Parquet file per source shard; 2-D columns are row-major lists of [rows, width]"}
    write_atomic(out / DESCRIPTION, json.dumps(description, indent=2).encode())
    return out


def _plain_table(block, widths: dict[str, int]) -> pa.Table:
    arrays, names = [], []
    for name, (offsets, values) in block.lists.items():
        if name in block.second_dim:
            widths[name] = int(block.second_dim[name])
        value_type = pa.int32() if np.issubdtype(values.dtype, np.integer) else pa.bool_() if values.dtype == bool else pa.float32()
        flat = values.astype(value_type.to_pandas_dtype(), copy=False)
        arrays.append(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, type=value_type)))
        names.append(name)
    for name, values in block.scalars.items():
        arrays.append(pa.array(values))
        names.append(name)
    order = sorted(range(len(names)), key=lambda i: (names[i] != "example_id", i))
    return pa.table([arrays[i] for i in order], names=[names[i] for i in order])
