"""Helpers shared by the benchmarks: synthetic teacher outputs, one-core pinning, the demo student, cache column sizes."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


def pin_one_core() -> None:
    """Per-core numbers: one intra-op thread for torch, numpy and Arrow."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import pyarrow as pa

        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
    except Exception:  # noqa: BLE001
        pass


def step_arguments(doc: str):
    """The arguments every train-step benchmark takes: steps timed, batch shape, k."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--k", type=int, default=64)
    return ap


def demo_student(vocab: int = 49_152):
    """The demo's student (StudentConfig's defaults: Llama, hidden 128, 4 blocks), freshly initialised with seed 0."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kdcache.train.config import StudentConfig

    s = StudentConfig()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
                      num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg), s


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def synthetic_topk(n_tokens: int, k: int = 64, vocab: int = 49_152, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k of Zipf-shaped noisy logits: ids skew to frequent tokens, log-probs fall off like an LM's."""
    g = torch.Generator().manual_seed(seed)
    prior = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    ids, lps, tails = [], [], []
    for start in range(0, n_tokens, 2048):
        n = min(2048, n_tokens - start)
        logp = torch.log_softmax(prior + 3.0 * torch.randn(n, vocab, generator=g), dim=-1)
        v, i = logp.topk(k, dim=-1)
        ids.append(i.int().numpy())
        lps.append(v.numpy())
        tails.append(torch.log(-torch.expm1(torch.logsumexp(v, -1))).numpy())
    return np.concatenate(ids), np.concatenate(lps), np.concatenate(tails)


def synthetic_examples(n_examples: int, length: int, pool: tuple, vocab: int = 49_152, seed: int = 0,
                       min_length: int | None = None, prompt_fraction: float = 0.0):
    """Examples drawing their rows from a pool of synthetic teacher outputs (random offsets). With ``min_length``,
    lengths are uniform in [min_length, length]; with ``prompt_fraction``, up to that fraction of each example's
    first targets are masked out (a prompt), as chat data is."""
    ids, lps, tails = pool
    rng = np.random.default_rng(seed)
    for e in range(n_examples):
        n = length if min_length is None else int(rng.integers(min_length, length + 1))
        off = int(rng.integers(0, len(ids) - n))
        input_ids = rng.integers(0, vocab, n, dtype=np.int32)
        mask = np.ones(n - 1, dtype=bool)
        if prompt_fraction > 0:
            mask[: int(rng.integers(0, int(prompt_fraction * (n - 1)) + 1))] = False
        yield {
            "example_id": str(e),
            "input_ids": input_ids,
            "loss_mask": mask,
            "topk_ids": ids[off : off + n - 1],
            "topk_logprobs": lps[off : off + n - 1],
            "tail_logprob": tails[off : off + n - 1],
            "teacher_nll": 2.0,
            "teacher_entropy": 3.0,
            "num_loss_tokens": int(mask.sum()),
        }


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def column_bytes(cache_dir: Path) -> dict[str, int]:
    """zstd-compressed bytes per column over all shards and row groups."""
    total: dict[str, int] = {}
    for f in sorted(cache_dir.glob("part-*.parquet")):
        for name, n in file_column_bytes(f).items():
            total[name] = total.get(name, 0) + n
    return total


def file_column_bytes(path) -> dict[str, int]:
    """zstd-compressed bytes per top-level column of one Parquet file (a list column's leaf counts as the column;
    kdcache's dotted stream names such as ``topk.ids_b0`` are columns of their own)."""
    import pyarrow.parquet

    f = pyarrow.parquet.ParquetFile(path)
    md, names = f.metadata, f.schema_arrow.names
    sizes: dict[str, int] = {}
    for rg in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(rg).column(c)
            leaf = col.path_in_schema
            name = next((n for n in names if leaf == n or leaf.startswith(n + ".")), leaf.split(".")[0])
            sizes[name] = sizes.get(name, 0) + col.total_compressed_size
    return sizes
