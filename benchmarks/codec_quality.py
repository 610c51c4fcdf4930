"""Does a student trained on a sqrt-delta cache (format 2) learn what one trained on the fp16 lists cache
(format 1) learns? Same teacher outputs, same students, 3 seeds.

The demo's teacher pass (SmolLM2-135M-Instruct, 300 docstrings, top-64) writes the format-1 cache; the same
rows are then re-encoded into a sqrt-delta cache (its decoded fp16 values through the codec: the codec's own
error on top of fp16's ~1e-7 nats). Standard-KD students with the demo's settings (recipe standard-kd:
kd, alpha 0.5, T = 1) train on each, and everyone is evaluated on the format-1 cache's held-out rows.

    python benchmarks/codec_quality.py [--work runs/codec-quality] [--seeds 0,1,2] [--kl 9e-5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import yaml

from kdcache.cache import CacheWriter, make_signals, open_cache
from kdcache.cli.demo import DemoConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.recipes import recipe_path
from kdcache.pipeline.smollm2 import smollm2_gguf
from kdcache.train.loop import train


def transcode(src: str, out: str, codec: str, options: dict) -> None:
    """The same examples, statistics and settings (plus the codec) in another top-k codec."""
    cache = open_cache(src)
    m = cache.manifest
    settings = {**m.settings, "scoring": {**m.settings["scoring"], "codec": codec, "codec_options": options}}
    signals = make_signals(m.top_k, m.signals["topk"]["vocab_size"], topk_codec=codec, topk_codec_options=options)
    w = CacheWriter(out, settings, signals, created_by="benchmarks/codec_quality.py")
    if w.complete:
        return
    if cache.tokenizer_dir is not None:
        import shutil

        shutil.copytree(cache.tokenizer_dir, Path(out) / "_tokenizer", dirs_exist_ok=True)
    columns = ["example_id", "input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logprob", "teacher_nll", "teacher_entropy", "num_loss_tokens"]
    for i, ex in enumerate(cache.stream(columns=columns)):
        w.add_row([ex], i + 1)
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/codec-quality")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kl", type=float, default=9e-5)
    args = ap.parse_args()
    work = Path(args.work)
    demo = DemoConfig()
    gen = dataclasses.replace(demo.generate, teacher=str(smollm2_gguf()), out=str(work / "cache-lists"), sampled_tokens=0)
    t0 = time.perf_counter()
    m = generate(gen, progress=False)
    print(f"{gen.out}: {m.num_rows} rows, {m.num_bytes / m.num_tokens:.1f} B/token, {time.perf_counter() - t0:.0f} s", flush=True)
    coded = str(work / "cache-sqrt-delta")
    transcode(gen.out, coded, "sqrt-delta", {"kl": args.kl})
    mc = open_cache(coded).manifest
    print(f"{coded}: {mc.num_bytes / mc.num_tokens:.1f} B/token", flush=True)
    recipe = yaml.safe_load(recipe_path("standard-kd").read_text())["train"]
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["bytes_per_token"] = {"lists": m.num_bytes / m.num_tokens, "sqrt-delta": mc.num_bytes / mc.num_tokens}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, cache in (("lists", gen.out), ("sqrt-delta", coded)):
            key = f"{name}@seed{seed}"
            if key in results:
                continue
            tcfg = dataclasses.replace(demo.train, cache=cache, eval_cache=gen.out, out=str(work / name / f"seed{seed}"), seed=seed, **recipe)
            final = train(tcfg, progress=False)
            results[key] = {k: final.get(k) for k in ("eval_ppl", "eval_kd", "eval_top1_agreement")}
            print(json.dumps({key: results[key]}), flush=True)
            results_path.write_text(json.dumps(results, indent=2))
    for name in ("lists", "sqrt-delta"):
        ppl = np.array([r["eval_ppl"] for k, r in results.items() if k.startswith(f"{name}@")])
        kd = np.array([r["eval_kd"] for k, r in results.items() if k.startswith(f"{name}@")])
        print(f"| {name} | {' / '.join(f'{x:.2f}' for x in ppl)} | {ppl.mean():.1f} ± {ppl.std(ddof=1):.1f} | {kd.mean():.4f} ± {kd.std(ddof=1):.4f} |")


if __name__ == "__main__":
    main()
