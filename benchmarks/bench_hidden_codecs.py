"""Hidden-state codecs on the real teacher: stored bytes per token per layer and error against fp32.

SmolLM2-135M-Instruct (the embedded GGUF) over the demo's docstrings; one cache per codec with the same
layers; bytes are the zstd Parquet column sizes of the hidden columns divided by tokens and layers; the
error is |decoded - fp32| / |fp32| per value (median, p99.9, max) and the relative L2 error per token.

    .venv/bin/python benchmarks/bench_hidden_codecs.py [--rows 64] [--layers 10,20,-1]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from common import machine
from kdcache.cache import open_cache
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.smollm2 import smollm2_gguf
from kdcache.pipeline.teachers import build_teacher


def hidden_bytes(cache_dir: Path) -> int:
    total = 0
    for f in sorted(cache_dir.glob("part-*.parquet")):
        md = pq.ParquetFile(f).metadata
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(rg).column(c)
                if col.path_in_schema.startswith("hidden_"):
                    total += col.total_compressed_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--layers", default="10,20,-1")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    with tempfile.TemporaryDirectory() as d:
        base = GenerateConfig(teacher=str(smollm2_gguf()), top_k=1, hidden_layers=layers, device="cpu",
                              data=DataConfig(source="embedded:stdlib-docs", max_rows=args.rows, max_length=128))
        teacher = build_teacher(base)
        caches = {}
        for codec in ("fp32", "fp16", "bf16"):
            out = Path(d) / codec
            generate(dataclasses.replace(base, hidden_codec=codec, out=str(out)), progress=False, teacher=teacher)
            caches[codec] = out
        teacher.close()
        ref = list(open_cache(caches["fp32"]))
        tokens = sum(len(ex["input_ids"]) for ex in ref)
        names = sorted(k for k in ref[0] if k.startswith("hidden_"))
        print(f"machine: {machine()}; {args.rows} docstrings, {tokens:,} tokens, layers {names}, H = {ref[0][names[0]].shape[-1]}\n")
        print("| codec | bytes/token/layer (zstd) | raw bytes/token/layer | rel. error median | p99.9 | max | rel. L2 per token, max |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for codec, out in caches.items():
            got = list(open_cache(out))
            rel, l2 = [], []
            for a, b in zip(ref, got):
                for n in names:
                    x, y = a[n].astype(np.float64), b[n].astype(np.float64)
                    nz = np.abs(x) > 0
                    rel.append(np.abs(y - x)[nz] / np.abs(x)[nz])
                    l2.append(np.linalg.norm(y - x, axis=-1) / np.linalg.norm(x, axis=-1))
            r, l = np.concatenate(rel), np.concatenate(l2)
            raw = 4 if codec == "fp32" else 2
            print(f"| {codec} | {hidden_bytes(out) / tokens / len(names):.0f} | {raw * ref[0][names[0]].shape[-1]} | "
                  f"{np.median(r):.2e} | {np.quantile(r, 0.999):.2e} | {r.max():.2e} | {l.max():.2e} |")


if __name__ == "__main__":
    main()
