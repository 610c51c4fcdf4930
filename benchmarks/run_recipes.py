"""Every shipped recipe (configs/recipes, `kdcache recipes`) on the demo task, next to the CE-only baseline.

One teacher pass (the demo's: SmolLM2-135M-Instruct over 300 stdlib docstrings, 128 tokens) writes a
cache with both signals the recipes read (top-64 + tail, and RS-KD draws); each student then trains with
the demo's settings (steps, student, data order, init, eval split) and the recipe's method keys (loss,
alpha and its schedule, temperature, tail, the losses' and pseudo-teachers' own sections, student dropout). Bytes per token are reported per signal from
the Parquet column sizes, so the RS-KD figure is what a sampled-only cache would hold.

Recipes that need another cache get it from the same 300 rows: the task-specific ones (sequence-level,
response-based) a cache of the teacher's continuations of each docstring's first --prompt-tokens tokens;
the ensemble a mixture of the demo cache and a second teacher's (SmolLM2 fine-tuned on the training rows,
benchmarks/domain_teacher.py), with a KD student of that second teacher alone beside it. Every student is
evaluated on the same held-out docstrings of the demo cache (train `eval_cache`), so perplexity and top-1
agreement with SmolLM2 compare across rows.

    python benchmarks/run_recipes.py [--work runs/recipes] [--steps 200] [--only a,b] [--seeds 0,1,2]
        [--set key=value ...] [--tag NAME]

With several seeds each row is trained once per seed (student init and data order; the cache is the same),
stored as ``row@seedN``, and summarised as mean and sample standard deviation. ``--set`` overrides a train
field in every row of this invocation (e.g. to compare candidate defaults) and ``--tag`` names those rows.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import yaml

from common import column_bytes
from domain_teacher import domain_teacher
from kdcache.cache import open_cache
from kdcache.cache.combine import combine_caches
from kdcache.config import set_dotted
from kdcache.pipeline.config import GenerateConfig, GenerationConfig
from kdcache.cli.demo import DemoConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.recipes import list_recipes, recipe_path
from kdcache.pipeline.smollm2 import smollm2_gguf
from kdcache.train.config import LEGACY_KEYS, TrainConfig
from kdcache.train.loop import train

METHOD_KEYS = ("loss", "losses", "alpha", "tempered_tail", "alpha_schedule", "alpha_end", "temperature", "tail",
               "pseudo_teacher", "pseudo_teachers", "curriculum", "terms", "stages", *LEGACY_KEYS)  # old flat keys: moved below
TEACHER_SIGNALS = ("hidden_layers", "hidden_codec", "attention_layers", "hidden_project_dim", "hidden_positions")  # recipes that read the teacher's insides


def recipe_caches(name: str, recipe: dict, base: GenerateConfig, work: Path, args: argparse.Namespace, eval_fraction: float) -> list[tuple[str, str, str]]:
    """[(row name, train cache, eval cache)] for a recipe; an empty eval cache means the train cache's own split."""
    gen = recipe.get("generate", {})
    if "ensemble" in recipe:
        teacher_b = domain_teacher(work / "teacher-b", base.out, eval_fraction, steps=args.teacher_b_steps)
        cache_b = dataclasses.replace(base, teacher=str(teacher_b), out=str(work / "cache-teacher-b"), sampled_tokens=0)
        generate(cache_b, progress=False)
        weights = recipe["ensemble"].get("weights", [0.5, 0.5])
        combine_caches([base.out, cache_b.out], weights, work / "cache-ensemble")
        return [(name, str(work / "cache-ensemble"), base.out), ("kd-teacher-b-alone", cache_b.out, base.out)]
    if gen.get("generation", {}).get("enabled"):
        cont = dataclasses.replace(base, out=str(work / f"cache-{name}"), top_k=gen.get("top_k", base.top_k), sampled_tokens=0, batch_tokens=args.generate_batch_tokens,
                                   generation=GenerationConfig(**{**gen["generation"], "prompt_tokens": args.prompt_tokens}))
        t0 = time.perf_counter()
        m = generate(cont, progress=False)
        print(f"{name} cache: {m.num_rows} continuations, {m.num_tokens} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
        return [(name, cont.out, base.out)]
    if any(k in gen for k in TEACHER_SIGNALS):  # the same rows with the teacher's hidden states / q/k/v; recipes asking alike share it
        signals = {**{k: gen[k] for k in TEACHER_SIGNALS if k in gen}, **args.generate_overrides}  # e.g. another hidden codec
        tag = "-".join(f"{k.split('_')[0]}{''.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted(signals.items())).replace(":", "")
        feat = dataclasses.replace(base, out=str(work / f"cache-{tag}"), sampled_tokens=0, **signals)
        t0 = time.perf_counter()
        m = generate(feat, progress=False)
        print(f"{name} cache {feat.out}: {m.num_rows} rows, {time.perf_counter() - t0:.0f} s", flush=True)
        return [(name, feat.out, base.out)]
    return [(name, base.out, "")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/recipes")
    ap.add_argument("--steps", type=int, default=None, help="default: the demo's")
    ap.add_argument("--only", default="", help="comma-separated recipe names, run in that order (default: all)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="task-specific recipes: docstring tokens the teacher continues")
    ap.add_argument("--generate-batch-tokens", type=int, default=16384,
                    help="task-specific recipes: rows per teacher batch x 128 (decoding is memory-bound: bigger batches, same cost per step)")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds per row (mean and spread reported)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="train field override for every row, key=value (YAML value)")
    ap.add_argument("--generate-set", dest="generate_overrides", action="append", default=[],
                    help="teacher-signal recipes: a generate field for their cache, key=value (e.g. hidden_codec=int8); use with --tag")
    ap.add_argument("--tag", default="", help="suffix for the row names of this invocation (use with --set)")
    ap.add_argument("--teacher-b-steps", type=int, default=16, help="ensemble: fine-tuning steps (x 8 docstrings) of the second teacher")
    args = ap.parse_args()
    args.generate_overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.generate_overrides)}
    work = Path(args.work)
    demo = DemoConfig()
    sampled = yaml.safe_load(recipe_path("rs-kd").read_text())["generate"]
    tempered = yaml.safe_load(recipe_path("kd-temperature").read_text())["generate"]["tail_temperatures"]
    gen = dataclasses.replace(demo.generate, teacher=str(smollm2_gguf()), out=str(work / "cache"), sampled_tokens=sampled["sampled_tokens"],
                              tail_temperatures=tempered)
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
    docs = {"ce-only": {"train": {"loss": "ce"}}, **{name: yaml.safe_load(recipe_path(name).read_text()) for name in list_recipes()}}
    # Recipes with their own benchmark, not one row here: born-again (`kdcache born-again`), the classifiers
    # (`kdcache classify`: benchmarks/cross_task.py) and context distillation (benchmarks/context_distill.py).
    own = lambda d: "generations" in d or "train" not in d or "context" in d.get("generate", {})  # noqa: E731
    names = args.only.split(",") if args.only else [n for n in docs if not own(docs[n])]
    unknown = [n for n in names if n not in docs]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; valid: {', '.join(docs)}")
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    seeds = [int(x) for x in args.seeds.split(",")]
    results = {}
    for name in names:  # in the order given
        method = {k: v for k, v in docs[name]["train"].items() if k in METHOD_KEYS or k == "student"}
        student = dataclasses.replace(demo.train.student, **method.get("student", {}))  # e.g. dropout for the dropout teacher
        keys = copy.deepcopy({k: v for k, v in method.items() if k != "student"})
        for k, v in overrides.items():  # --set losses.jsd.beta=0.3 goes into its section
            set_dotted(keys, k, v)
        keys = TrainConfig.upgrade_keys(keys)  # flat keys of earlier versions (--set beta=...) into their sections
        for row, cache, eval_cache in recipe_caches(name, docs[name], gen, work, args, demo.train.eval_fraction):
            row = row + (f"+{args.tag}" if args.tag else "")
            for seed in seeds:
                key = row if seeds == [0] else f"{row}@seed{seed}"
                tcfg = dataclasses.replace(demo.train, cache=cache, eval_cache=eval_cache, out=str(work / key), student=student, **keys,
                                           seed=seed, **({"steps": args.steps} if args.steps else {}))
                t0 = time.perf_counter()
                final = train(tcfg, progress=False)
                results[key] = {"eval_ppl": final["eval_ppl"], "eval_top1_agreement": final.get("eval_top1_agreement"),
                                "teacher_ppl": final.get("teacher_ppl"), "peers": final.get("peers"), "cache": cache,
                                "seconds": round(time.perf_counter() - t0), "method": {**method, **overrides}, "seed": seed}
                print(json.dumps({key: results[key]}), flush=True)
    saved = work / "results.json"  # runs with --only add their rows to the earlier ones
    earlier = json.loads(saved.read_text())["recipes"] if saved.is_file() else {}
    saved.write_text(json.dumps({"bytes": bytes_info, "recipes": {**earlier, **results}}, indent=2))
    print("| recipe | loss | held-out ppl | top-1 agreement |\n|---|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['method']['loss']} | {r['eval_ppl']:.2f} | {r['eval_top1_agreement']:.3f} |")
    print(summarize_seeds({**earlier, **results}))


def summarize_seeds(results: dict) -> str:
    """Mean and sample standard deviation over ``row@seedN`` entries, one line per row."""
    groups: dict[str, list[dict]] = {}
    for key, r in results.items():
        groups.setdefault(key.split("@seed")[0], []).append(r)
    lines = ["| row | seeds | held-out ppl (mean ± sd) | top-1 agreement (mean ± sd) |", "|---|---:|---:|---:|"]
    for row, rs in groups.items():
        ppl = np.array([r["eval_ppl"] for r in rs])
        top1 = np.array([r["eval_top1_agreement"] or float("nan") for r in rs])
        sd = (lambda a: a.std(ddof=1) if len(a) > 1 else float("nan"))
        lines.append(f"| {row} | {len(rs)} | {ppl.mean():.1f} ± {sd(ppl):.1f} | {top1.mean():.3f} ± {sd(top1):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
