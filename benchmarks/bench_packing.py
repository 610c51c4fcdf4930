"""Tokens/s of a train step, packed (``packing: true``) versus padded, on the demo data, side by side in one run.

Two sets of examples, each cut into micro-batches of the demo's batch_size (8):

- ``demo cache``: the demo's cache (``kdcache demo``, or ``kdcache generate --config kdcache/configs/demo.yaml
  --teacher <SmolLM2 gguf>``: 300 stdlib docstrings, at most 128 tokens, top-64 and 28 sampled tokens), read as the
  trainer reads it (shuffled by seed 0, the 10% held-out split left out), trained with the demo's loss (rskd, alpha 0.5);
- ``docstrings@512``: the same 300 docstrings tokenised by the cache's tokenizer at max_length 512 instead of 128
  (real lengths: the demo truncates 177 of the 300 rows at 128), with synthetic top-64 targets (benchmarks/common.py),
  trained with kd, alpha 0.5.

Each micro-batch is trained once padded and once packed, interleaved, each layout on its own copy of the demo
student (Llama, hidden 128, 4 blocks, vocab 49,152) with its own AdamW: forward, loss, backward, optimizer step.
Making the batch (collate or pack) is timed apart. One thread. Reported: the padding share of each layout over all
micro-batches, rows per micro-batch, the median step, tokens/s (real input tokens; and target tokens, what the
trainer logs as tokens_per_s), and the two layouts' loss on the first micro-batch (the same model, so equal).

    python benchmarks/bench_packing.py --cache runs/demo/cache [--steps 24] [--long-length 512]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time

import numpy as np
import torch

from common import demo_student, machine, pin_one_core, synthetic_topk
from kdcache.cache import holdout_fraction_filter, open_cache
from kdcache.train import packing
from kdcache.train.config import TrainConfig
from kdcache.train.data import collate, train_columns
from kdcache.train.losses import LossSettings, get_loss
from kdcache.train.objective import Objective, forward
from kdcache.train.optim import build_optimizer

LAYOUTS = {"padded": collate, "packed": packing.pack}


def cache_examples(path: str, loss: str, eval_fraction: float) -> list[dict]:
    cache = open_cache(path)
    heldout = holdout_fraction_filter(eval_fraction)
    return list(cache.stream(shuffle=True, seed=0, columns=train_columns(cache, get_loss(loss).needs), keep=lambda i: not heldout(i)))


def docstring_examples(tokenizer_dir: str, max_length: int, k: int = 64, seed: int = 0) -> list[dict]:
    """The demo's 300 docstrings at another max_length, with synthetic top-k targets, in a seeded order."""
    from transformers import AutoTokenizer

    from kdcache.pipeline.config import DataConfig
    from kdcache.pipeline.data import RowTokenizer, Tokenized, iter_rows

    cfg = DataConfig(source="embedded:stdlib-docs", max_rows=300, max_length=max_length)
    rows = list(iter_rows(cfg))
    rt = RowTokenizer(AutoTokenizer.from_pretrained(tokenizer_dir), cfg)
    rt.resolve_format(rows[0])
    toks = [t for t in map(rt, rows) if isinstance(t, Tokenized)]
    ids, lps, tails = synthetic_topk(8192, k=k, seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for j in rng.permutation(len(toks)):
        t = toks[j]
        n = len(t.input_ids) - 1
        off = int(rng.integers(0, len(ids) - n))
        m = t.loss_mask
        out.append({"example_id": str(j), "input_ids": t.input_ids, "loss_mask": m, "topk_ids": ids[off : off + n][m],
                    "topk_logprobs": lps[off : off + n][m], "tail_logprob": tails[off : off + n][m],
                    "teacher_nll": 2.0, "num_loss_tokens": int(m.sum())})
    return out


def compare(examples: list[dict], loss: str, alpha: float, batch: int, steps: int, vocab: int) -> dict:
    micro = [examples[i : i + batch] for i in range(0, len(examples) - batch + 1, batch)]
    out: dict = {"micro_batches": len(micro)}
    real = sum(len(ex["input_ids"]) for mb in micro for ex in mb)
    for name, make in LAYOUTS.items():
        made, prep = [make(mb, 0, None) for mb in micro[:2]], []
        for mb in micro:
            t0 = time.perf_counter()
            made.append(make(mb, 0, None))
            prep.append(time.perf_counter() - t0)
        cells = sum(b.input_ids.numel() for b in made[2:])
        out[name] = {"padding_fraction": round(1 - real / cells, 4), "rows_per_micro_batch": round(sum(b.input_ids.shape[0] for b in made[2:]) / len(micro), 2),
                     "row_length_mean": round(float(np.mean([b.input_ids.shape[1] for b in made[2:]])), 1),
                     "median_make_batch_ms": round(1e3 * statistics.median(prep), 3)}

    model, _ = demo_student(vocab)
    models = {"padded": model, "packed": copy.deepcopy(model)}
    packing.enable(models["packed"])
    opts = {name: build_optimizer(m.train(), TrainConfig(cache="x", out="x")) for name, m in models.items()}
    objective = Objective(loss, get_loss(loss), None, [], [], 0, 1)
    settings = LossSettings(temperature=1.0, alpha=alpha)
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    timed = micro[: steps + 2]  # 2 warm-up steps
    for i, mb in enumerate(timed):
        for name, make in LAYOUTS.items():
            b = make(mb, 0, None)
            t0 = time.perf_counter()
            value, _ = forward(models[name], b, objective, settings, contextlib.nullcontext)
            (value / b.num_tokens).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
            if i == 0:
                out[name]["first_batch_loss_per_target"] = value.item() / b.num_tokens
    tokens = sum(len(ex["input_ids"]) for mb in timed[2:] for ex in mb)
    targets = sum(int(ex["loss_mask"].sum()) for mb in timed[2:] for ex in mb)
    for name in LAYOUTS:
        total = sum(times[name])
        out[name].update({"median_step_s": round(statistics.median(times[name]), 4), "tokens_per_s": round(tokens / total, 1),
                          "target_tokens_per_s": round(targets / total, 1)})
    out["speedup_tokens_per_s"] = round(out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="runs/demo/cache")
    ap.add_argument("--steps", type=int, default=24, help="micro-batches timed per layout and data set (after 2 warm-up steps)")
    ap.add_argument("--batch", type=int, default=8, help="examples per micro-batch (the demo's batch_size)")
    ap.add_argument("--long-length", type=int, default=512, help="max_length of the second data set (0: skip it)")
    args = ap.parse_args()
    pin_one_core()
    cache = open_cache(args.cache)
    vocab = cache.manifest.vocab_size
    sets = {"demo cache (max_length 128), rskd": (cache_examples(args.cache, "rskd", 0.1), "rskd")}
    if args.long_length:
        sets[f"docstrings@{args.long_length}, synthetic top-64, kd"] = (docstring_examples(str(cache.tokenizer_dir), args.long_length), "kd")
    result: dict = {"machine": machine(), "threads": torch.get_num_threads(), "cache": args.cache,
                    "student": "demo student: Llama hidden 128 x 4 blocks, vocab 49152; alpha 0.5", "batch": args.batch}
    lines = ["| data | layout | rows x length / micro-batch | padding | step (median) | tokens/s | target tokens/s | make batch |",
             "|---|---|---|---|---|---|---|---|"]
    for label, (examples, loss) in sets.items():
        lens = np.array([len(ex["input_ids"]) for ex in examples])
        r = compare(examples, loss, 0.5, args.batch, args.steps, vocab)
        r["lengths"] = f"{len(lens)} examples, {lens.min()}..{lens.max()} tokens (median {int(np.median(lens))}, mean {lens.mean():.1f})"
        result[label] = r
        for name in LAYOUTS:
            x = r[name]
            lines.append(f"| {label} | {name} | {x['rows_per_micro_batch']} x {x['row_length_mean']:.0f} | {x['padding_fraction']:.1%} | "
                         f"{x['median_step_s'] * 1e3:.0f} ms | {x['tokens_per_s']:.0f} | {x['target_tokens_per_s']:.0f} | {x['median_make_batch_ms']:.2f} ms |")
    print(json.dumps(result, indent=2))
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
