"""Sampled continuations on the transformers backend: every prompt decoded in one batch versus one prompt
at a time (how kdcache sampled before per-row seeded draws), same teacher, prompts, seeds and lengths.

SmolLM2-135M-Instruct continues the first --prompt-tokens tokens of embedded stdlib docstrings; the two
ways alternate (--repeats) so machine noise hits both. The share of continuations identical in both ways
is reported: each row's draws depend on its seed only, so they differ only where padding changes the
logits' float rounding enough to move a draw across a CDF boundary.

    python benchmarks/bench_generation.py [--prompts 32] [--samples 2] [--new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from common import machine
from kdcache.pipeline.config import DataConfig, GenerationConfig
from kdcache.pipeline.data import iter_rows
from kdcache.pipeline.smollm2 import smollm2_gguf
from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    teacher = TransformersTeacher(str(smollm2_gguf()), device="cpu", dtype="float32")
    teacher.load()
    texts = [r["text"] for _, r in zip(range(args.prompts), iter_rows(DataConfig(source="embedded:stdlib-docs")))]
    prompts = [np.asarray(teacher.tokenizer(t)["input_ids"][: args.prompt_tokens]) for t in texts]
    seeds = list(range(len(prompts)))
    cfg = GenerationConfig(enabled=True, do_sample=True, temperature=0.7, num_samples=args.samples, max_new_tokens=args.new_tokens)
    times: dict[str, list[float]] = {"batched": [], "one_prompt_at_a_time": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        batched = teacher.generate(prompts, cfg, seeds)
        times["batched"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        single = [teacher.generate([p], cfg, [s])[0] for p, s in zip(prompts, seeds)]
        times["one_prompt_at_a_time"].append(time.perf_counter() - t0)
    pairs = [(a, b) for x, y in zip(batched, single) for a, b in zip(x, y)]
    same = sum(np.array_equal(a, b) for a, b in pairs) / len(pairs)
    tokens = sum(len(c) for samples in batched for c in samples)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "machine": machine(),
        "setting": f"{len(prompts)} prompts x {args.samples} samples, {args.prompt_tokens}-token prompts, up to {args.new_tokens} new tokens, T=0.7",
        "generated_tokens": tokens,
        "median_s": {k: round(v, 2) for k, v in med.items()},
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in med.items()},
        "speedup_batched": round(med["one_prompt_at_a_time"] / med["batched"], 2),
        "identical_continuations": round(same, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
