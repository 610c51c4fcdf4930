"""Does the step wait for the cache? A KD train step (demo student, forward + backward + AdamW) fed three ways
with the same batches: from memory (collated beforehand), from the cache in the step's thread (prefetch 0), and
from the cache with the background prefetch (the trainer's default). The cache is read on the trainer's path
(opened as the trainer opens it, shuffled window, held-out filter, variable lengths, masked prompts).

The three ways take turns in blocks of --block steps (machine noise hits all alike); per-step medians reported.

    python benchmarks/bench_prefetch_step.py [--steps 60] [--batch 8] [--length 128] [--topk-codec sqrt-delta]
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import demo_student, machine, step_arguments, synthetic_examples, synthetic_topk
from kdcache.cache import CacheWriter, holdout_fraction_filter, make_signals, open_cache
from kdcache.train.config import TrainConfig
from kdcache.train.data import EVAL_SIGNALS, batches, train_columns
from kdcache.train.losses import LossSettings, get_loss
from kdcache.train.objective import Objective, forward
from kdcache.train.optim import build_optimizer
from kdcache.train.prefetch import Prefetcher


def main() -> None:
    ap = step_arguments(__doc__)
    ap.add_argument("--topk-codec", default="sqrt-delta")
    ap.add_argument("--block", type=int, default=5, help="steps per turn")
    ap.set_defaults(steps=60)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kdcache-step-"))
    try:
        pool = synthetic_topk(60_000, k=args.k)
        n_examples = args.batch * (args.steps + 20)
        w = CacheWriter(root / "c", {"bench": 1}, make_signals(args.k, 49_152, topk_codec=args.topk_codec))
        for i, ex in enumerate(synthetic_examples(n_examples, args.length, pool, min_length=args.length // 2, prompt_fraction=0.25)):
            w.add_row([ex], i + 1)
        w.close()
        is_heldout = holdout_fraction_filter(0.05)

        def cache_batches():
            cache = open_cache(root / "c", topk_order="any", keep_float16=True)
            stream = cache.stream(shuffle=True, seed=0, window=4, epochs=None, columns=train_columns(cache, EVAL_SIGNALS),
                                  keep=lambda i: not is_heldout(i))
            return batches(stream, args.batch)

        in_memory = list(itertools.islice(cache_batches(), args.steps))
        sources = {
            "in_memory": iter(itertools.cycle(in_memory)),
            "cache_prefetch_0": cache_batches(),
            "cache_prefetch_2": (b for b, _ in Prefetcher(cache_batches(), dict, depth=2)),
        }
        model, _ = demo_student()
        opt = build_optimizer(model, TrainConfig(cache="x", out="x"))
        kd = get_loss("kd")
        objective = Objective("kd", kd, None, [], [], 0, 1)
        settings = LossSettings(temperature=1.0, alpha=0.5)
        device = torch.device("cpu")
        times: dict[str, list[float]] = {k: [] for k in sources}
        for turn in range(args.steps // args.block + 1):
            for name, src in sources.items():
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    b = next(src).to(device)
                    loss, _ = forward(model, b, objective, settings, contextlib.nullcontext)
                    (loss / b.num_tokens).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if turn > 0:  # the first turn warms up allocator and caches
                        times[name].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(times["in_memory"])
    print(json.dumps({
        "machine": machine(), "torch_threads": torch.get_num_threads(), "batch": args.batch, "length": args.length,
        "k": args.k, "topk_codec": args.topk_codec, "steps_timed": len(times["in_memory"]),
        **{f"{n}_step_ms": round(1000 * statistics.median(t), 2) for n, t in times.items()},
        **{f"{n}_over_in_memory": round(statistics.median(t) / base - 1, 4) for n, t in times.items() if n != "in_memory"},
    }, indent=2))


if __name__ == "__main__":
    main()
