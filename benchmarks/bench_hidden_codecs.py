"""Hidden-state storage on the real teacher: stored bytes per token per layer and error against fp32.

SmolLM2-135M-Instruct (the embedded GGUF) over the demo's docstrings; one cache per variant with the same
layers: codecs fp32/fp16/bf16/int8 (int8: one float32 scale per token), int8 after a seeded orthogonal
projection to D = 192 (``hidden_project_dim``), and bf16 at every second position (``hidden_positions=stride:2``).
Bytes are the zstd Parquet column sizes of everything the hidden signal stores (``hidden_<L>``, its
``_scale`` column, the shared ``hidden_positions`` column split over the layers) divided by the tokens of
the sequences (not the stored positions) and by the layers. The error is the relative L2 error per stored
token, ``|decoded - ref| / |ref|``, with ref the fp32 cache's hidden state at the same position, and for the
projected variant ``ref = h @ P`` (the error is measured in the projected space, where the cache lives;
what the projection itself drops is not counted).

    .venv/bin/python benchmarks/bench_hidden_codecs.py [--rows 64] [--layers 10,20,-1] [--project-dim 192]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from common import column_bytes, machine
from kdcache.cache import open_cache
from kdcache.cache.hidden import orthogonal_projection
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.smollm2 import smollm2_gguf
from kdcache.pipeline.teachers import build_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--layers", default="10,20,-1")
    ap.add_argument("--project-dim", type=int, default=192)
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    D = args.project_dim
    variants = {
        "fp32": {"hidden_codec": "fp32"},
        "fp16": {"hidden_codec": "fp16"},
        "bf16": {"hidden_codec": "bf16"},
        "int8": {"hidden_codec": "int8"},
        f"int8 + project D={D}": {"hidden_codec": "int8", "hidden_project_dim": D},
        "bf16 + stride:2": {"hidden_codec": "bf16", "hidden_positions": "stride:2"},
    }
    with tempfile.TemporaryDirectory() as d:
        base = GenerateConfig(teacher=str(smollm2_gguf()), top_k=1, hidden_layers=layers, device="cpu",
                              data=DataConfig(source="embedded:stdlib-docs", max_rows=args.rows, max_length=128))
        teacher = build_teacher(base)
        caches = {}
        for i, (name, kw) in enumerate(variants.items()):
            out = Path(d) / f"v{i}"
            generate(dataclasses.replace(base, out=str(out), **kw), progress=False, teacher=teacher)
            caches[name] = out
        teacher.close()
        ref = list(open_cache(caches["fp32"]))
        tokens = sum(len(ex["input_ids"]) for ex in ref)
        names = sorted(k for k in ref[0] if k.startswith("hidden_") and k != "hidden_positions")
        H = ref[0][names[0]].shape[-1]
        print(f"machine: {machine()}; {args.rows} docstrings, {tokens:,} tokens, layers {names}, H = {H}\n")
        print("| variant | stored width | positions | bytes/token/layer (zstd) | raw bytes/token/layer | "
              "rel. L2 per token, median | p99.9 | max | feature-KD ppl |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for name, out in caches.items():
            cache = open_cache(out)
            sig = cache.manifest.signals["hidden"]
            got = list(cache)
            P = orthogonal_projection(sig["width"], sig["project_dim"], sig["project_seed"]).astype(np.float64) if "project_dim" in sig else None
            l2, rows = [], 0
            for a, b in zip(ref, got):
                pos = b.get("hidden_positions", np.arange(len(a["input_ids"])))
                rows += len(pos)
                for n in names:
                    x = a[n][pos].astype(np.float64)
                    x = x @ P if P is not None else x
                    l2.append(np.linalg.norm(b[n] - x, axis=-1) / np.linalg.norm(x, axis=-1))
            err = np.concatenate(l2)
            sizes = column_bytes(out)
            stored = sum(v for k, v in sizes.items() if k in sig["columns"])
            width = sig["size"]
            per_row = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}[cache.manifest.settings["scoring"]["hidden_codec"]] * width
            per_row += 4 if any(k.endswith("_scale") for k in sig["columns"]) else 0
            raw = per_row * rows / tokens + (4 * rows / tokens / len(names) if "hidden_positions" in sig["columns"] else 0)
            fmt = lambda v: "0" if v == 0 else f"{v:.2e}"  # noqa: E731
            print(f"| {name} | {width} | {sig.get('positions', 'all')} | {stored / tokens / len(names):.0f} | {raw:.0f} | "
                  f"{fmt(np.median(err))} | {fmt(np.quantile(err, 0.999))} | {fmt(err.max())} | — |")


if __name__ == "__main__":
    main()
