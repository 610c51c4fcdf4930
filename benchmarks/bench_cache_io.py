"""Writer and reader throughput per core (k=64, V=49,152) and bytes per token.

Writer: examples (numpy teacher outputs) -> Arrow -> zstd Parquet shards, manifest commits included.
Reader: shards -> decoded numpy -> padded torch batches (collate) on the trainer's own path: the cache opened as
the trainer opens it, a shuffled window, the held-out filter, loss masks (a masked prompt of up to --prompt-fraction)
and lengths uniform in [--min-length, --length]. Tokens/s counts the tokens of the examples delivered.
For a coded top-k, the same read again with the codes kept for the device (``topk_decode: device``): the host's
work then, and separately the decode that the device does, run by torch on this CPU core.

    python benchmarks/bench_cache_io.py [--tokens 400000] [--repeats 3] [--topk-codecs lists,sqrt-delta]

With several top-k codecs, each repeat writes and reads one cache per codec in turn (ratios side by side).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from common import Timer, machine, pin_one_core, synthetic_examples, synthetic_topk

from kdcache.cache import CacheWriter, holdout_fraction_filter, make_signals, open_cache
from kdcache.train.data import EVAL_SIGNALS, batches, collate, topk_decoder, train_columns


def read(out: Path, seed: int, is_heldout, topk_codes: bool):
    """The trainer's read: the cache opened as the trainer opens it, a shuffled window, the held-out filter, padded
    batches of 8; ``topk_codes``: the top-k left coded for the device (``topk_decode: device``)."""
    cache = open_cache(out, topk_order="any", keep_float16=True)
    stream = cache.stream(shuffle=True, seed=seed, window=4, epochs=1, keep=lambda i: not is_heldout(i),
                          columns=train_columns(cache, EVAL_SIGNALS, topk_codes=topk_codes))
    decode = topk_decoder(cache) if topk_codes else None
    return batches(stream, batch_size=8, collate_fn=lambda ex, pad, tail: collate(ex, pad, tail, decode))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=400_000)
    ap.add_argument("--length", type=int, default=512, help="longest example (tokens)")
    ap.add_argument("--min-length", type=int, default=64, help="shortest example (tokens)")
    ap.add_argument("--prompt-fraction", type=float, default=0.25, help="targets masked out at most, per example")
    ap.add_argument("--eval-fraction", type=float, default=0.05, help="held out by the trainer's filter")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--codec", default="fp16", help="value codec of the lists top-k codec")
    ap.add_argument("--topk-codecs", default="lists", help="comma-separated top-k codecs to compare")
    args = ap.parse_args()
    codecs = args.topk_codecs.split(",")
    pin_one_core()
    pool = synthetic_topk(60_000, k=args.k)
    n_examples = 2 * args.tokens // (args.length + args.min_length)
    examples = list(synthetic_examples(n_examples, args.length, pool, min_length=args.min_length, prompt_fraction=args.prompt_fraction))
    tokens = sum(len(ex["input_ids"]) for ex in examples)
    is_heldout = holdout_fraction_filter(args.eval_fraction)
    delivered = sum(len(ex["input_ids"]) for ex in examples if not is_heldout(ex["example_id"]))
    root = Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    write_s, read_s, bpt = {c: [] for c in codecs}, {c: [] for c in codecs}, {}
    codes_s: dict[str, list[float]] = {}
    torch_decode_s: dict[str, list[float]] = {}
    try:
        for r, codec in ((r, c) for r in range(args.repeats) for c in codecs):
            out = root / f"c{r}-{codec}"
            with Timer() as t:
                w = CacheWriter(out, {"bench": r}, make_signals(args.k, 49_152, args.codec, topk_codec=codec), shard_tokens=2_000_000)
                for i, ex in enumerate(examples):
                    w.add_row([ex], i + 1)
                m = w.close()
            write_s[codec].append(t.seconds)
            bpt[codec] = m.num_bytes / m.num_tokens
            with Timer() as t:
                n = sum(int(b.attention_mask.sum()) for b in read(out, r, is_heldout, topk_codes=False))
            read_s[codec].append(t.seconds)
            assert n == delivered
            if open_cache(out).topk_code_columns:  # the same read, the top-k kept as codes for the device (topk_decode: device)
                with Timer() as t:
                    coded = list(read(out, r, is_heldout, topk_codes=True))
                codes_s.setdefault(codec, []).append(t.seconds)
                with Timer() as t:  # what the device then does, here on this CPU core in torch
                    for b in coded:
                        b.to(torch.device("cpu"))
                torch_decode_s.setdefault(codec, []).append(t.seconds)
                assert sum(int(b.attention_mask.sum()) for b in coded) == delivered
                del coded
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"machine": machine(), "tokens": tokens, "k": args.k, "value_codec": args.codec}
    for c in codecs:
        result[c] = {
            "bytes_per_token": round(bpt[c], 1),
            "writer_tokens_per_s_median": round(tokens / statistics.median(write_s[c])),
            "writer_tokens_per_s_best": round(tokens / min(write_s[c])),
            "reader_tokens_per_s_median": round(delivered / statistics.median(read_s[c])),
            "reader_tokens_per_s_best": round(delivered / min(read_s[c])),
        }
        if c in codes_s:  # host side when the device decodes, and that decode run by torch on this CPU core
            result[c]["reader_codes_to_device_tokens_per_s_median"] = round(delivered / statistics.median(codes_s[c]))
            result[c]["torch_cpu_decode_tokens_per_s_median"] = round(delivered / statistics.median(torch_decode_s[c]))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
