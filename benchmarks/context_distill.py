"""Context distillation on the demo task: how close does a student that never sees the context get to the
prompted teacher?

The teacher (SmolLM2-135M-Instruct) scores the demo's 300 docstrings twice: plain (the demo cache) and with
the context of recipe context-kd (each docstring's file and name before it). Students with the demo's
settings train on each: CE only, standard KD from the plain teacher, KD from the prompted teacher (the
recipe). Everyone is measured on the same held-out docstrings against the PROMPTED teacher: KL(prompted
teacher || model) over its top-64 + tail buckets (train's `eval_kd` on the context cache), and held-out
perplexity of the real text. The unprompted teacher itself (converted to a folder) is the reference row.

    python benchmarks/context_distill.py [--work runs/context] [--seeds 0,1,2] [--steps 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import yaml

from kdcache.cli.demo import DemoConfig
from kdcache.pipeline.convert import convert_model
from kdcache.pipeline.generate import generate
from kdcache.pipeline.recipes import recipe_path
from kdcache.pipeline.smollm2 import smollm2_gguf
from kdcache.train.evaluate import evaluate_student
from kdcache.train.loop import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/context")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=None, help="default: the demo's")
    args = ap.parse_args()
    work = Path(args.work)
    demo = DemoConfig()
    recipe = yaml.safe_load(recipe_path("context-kd").read_text())
    plain = dataclasses.replace(demo.generate, teacher=str(smollm2_gguf()), out=str(work / "cache"))
    prompted = dataclasses.replace(plain, out=str(work / "cache-context"), context=recipe["generate"]["context"])
    for cfg in (plain, prompted):
        t0 = time.perf_counter()
        m = generate(cfg, progress=False)
        print(f"{cfg.out}: {m.num_rows} rows, {m.num_tokens} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
    teacher_dir = work / "teacher-fp32"
    if not (teacher_dir / "config.json").is_file():
        convert_model(str(smollm2_gguf()), teacher_dir, dtype="float32")
    ev = dict(eval_fraction=demo.train.eval_fraction, max_examples=demo.train.eval_max_examples, device="cpu")
    results = {"unprompted-teacher": evaluate_student(prompted.out, str(teacher_dir), **ev)}
    print(json.dumps(results), flush=True)
    rows = [("ce-only", plain.out, {"loss": "ce"}),
            ("standard-kd (plain teacher)", plain.out, {"loss": "kd", "alpha": recipe["train"]["alpha"]}),
            ("context-kd (prompted teacher)", prompted.out, {k: v for k, v in recipe["train"].items()})]
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, cache, keys in rows:
            key = f"{name}@seed{seed}"
            out = work / name.split(" ")[0] / f"seed{seed}"
            tcfg = dataclasses.replace(demo.train, cache=cache, eval_cache=prompted.out, out=str(out), seed=seed, **keys,
                                       **({"steps": args.steps} if args.steps else {}))
            t0 = time.perf_counter()
            final = train(tcfg, progress=False)
            results[key] = {k: final.get(k) for k in ("eval_kd", "eval_ppl", "eval_top1_agreement", "teacher_ppl")}
            results[key]["seconds"] = round(time.perf_counter() - t0)
            print(json.dumps({key: results[key]}), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    groups: dict[str, list[dict]] = {}
    for key, r in results.items():
        groups.setdefault(key.split("@seed")[0], []).append(r)
    sd = (lambda a: a.std(ddof=1) if len(a) > 1 else float("nan"))
    lines = ["| row | KL(prompted teacher ‖ row), nats/token, per seed | mean ± sd | held-out ppl, mean ± sd |", "|---|---|---:|---:|"]
    for row, rs in groups.items():
        kl = np.array([r["eval_kd"] for r in rs])
        ppl = np.array([r["eval_ppl"] for r in rs])
        lines.append(f"| {row} | {' / '.join(f'{x:.3f}' for x in kl)} | {kl.mean():.3f} ± {sd(kl):.3f} | {ppl.mean():.1f} ± {sd(ppl):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
