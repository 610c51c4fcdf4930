"""Every recipe in configs/recipes on the demo task, next to the CE-only baseline.

One teacher pass (the demo's: SmolLM2-135M-Instruct over 300 stdlib docstrings, 128 tokens) writes a
cache with both signals the recipes read (top-64 + tail, and RS-KD draws); each student then trains with
the demo's settings (steps, student, data order, init, eval split) and the recipe's method keys (loss,
alpha and its schedule, temperature, tail, beta, skew, pseudo-teacher settings, student dropout). Bytes per token are reported per signal from
the Parquet column sizes, so the RS-KD figure is what a sampled-only cache would hold.

    python benchmarks/run_recipes.py [--work runs/recipes] [--steps 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from kdcache.cache import open_cache
from kdcache.pipeline.demo import DemoConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.smollm2 import smollm2_gguf
from kdcache.train.loop import train

METHOD_KEYS = ("loss", "alpha", "alpha_schedule", "alpha_end", "temperature", "tail", "beta", "skew", "correct_prob",
               "pseudo_teacher", "ema_decay", "augment_prob", "pseudo_top_k", "num_peers", "peer_teacher_weight")
RECIPES = Path(__file__).resolve().parent.parent / "configs" / "recipes"


def column_bytes(cache_dir: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for shard in sorted(cache_dir.glob("part-*.parquet")):
        md = pq.ParquetFile(shard).metadata
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(rg).column(c)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/recipes")
    ap.add_argument("--steps", type=int, default=None, help="default: the demo's")
    ap.add_argument("--only", default="", help="comma-separated recipe names, run in that order (default: all)")
    args = ap.parse_args()
    work = Path(args.work)
    demo = DemoConfig()
    sampled = yaml.safe_load((RECIPES / "rs-kd.yaml").read_text())["generate"]
    gen = dataclasses.replace(demo.generate, teacher=str(smollm2_gguf()), out=str(work / "cache"), sampled_tokens=sampled["sampled_tokens"])
    t0 = time.perf_counter()
    m = generate(gen, progress=False)
    print(f"cache: {m.num_rows} rows, {m.num_tokens} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
    cb = column_bytes(Path(gen.out))
    base = sum(cb[c] for c in ("example_id", "input_ids", "loss_mask", "teacher_nll", "teacher_entropy", "num_loss_tokens"))
    sizes = [ex["sampled_sizes"].mean() for ex in open_cache(gen.out).stream(columns=["sampled_sizes"])]
    bytes_info = {
        "topk64_bytes_per_token": (base + sum(cb[c] for c in ("topk_ids", "topk_logprobs", "tail_logprob"))) / m.num_tokens,
        "rskd_bytes_per_token": (base + sum(cb[c] for c in ("sampled_ids", "sampled_weights", "sampled_sizes"))) / m.num_tokens,
        "rskd_distinct_per_position": float(sum(sizes) / len(sizes)),
    }
    print(json.dumps(bytes_info), flush=True)
    names = [n for n in (args.only.split(",") if args.only else [])]
    docs = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(RECIPES.glob("*.yaml"))}
    skipped = [n for n, d in docs.items() if "ensemble" in d]  # one real teacher here; the mixture is tested in tests/test_combine.py
    recipes = [("ce-only", {"loss": "ce"})] + [
        (n, {k: v for k, v in d["train"].items() if k in METHOD_KEYS or k == "student"}) for n, d in docs.items() if n not in skipped
    ]
    if skipped:
        print(f"skipped (need several teachers): {', '.join(skipped)}", flush=True)
    if names:  # in the order given
        by_name = dict(recipes)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown recipes {unknown}; valid: {', '.join(by_name)}")
        recipes = [(n, by_name[n]) for n in names]
    results = {}
    for name, method in recipes:
        student = dataclasses.replace(demo.train.student, **method.get("student", {}))  # e.g. dropout for the dropout teacher
        keys = {k: v for k, v in method.items() if k != "student"}
        tcfg = dataclasses.replace(demo.train, cache=gen.out, out=str(work / name), student=student, **keys, **({"steps": args.steps} if args.steps else {}))
        t0 = time.perf_counter()
        final = train(tcfg, progress=False)
        results[name] = {"eval_ppl": final["eval_ppl"], "eval_top1_agreement": final.get("eval_top1_agreement"),
                         "teacher_ppl": final.get("teacher_ppl"), "seconds": round(time.perf_counter() - t0), "method": method}
        print(json.dumps({name: results[name]}), flush=True)
    (work / "results.json").write_text(json.dumps({"bytes": bytes_info, "recipes": results}, indent=2))
    print("| recipe | loss | held-out ppl | top-1 agreement |\n|---|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['method']['loss']} | {r['eval_ppl']:.2f} | {r['eval_top1_agreement']:.3f} |")


if __name__ == "__main__":
    main()
