"""Cross-task and cross-modal distillation on a real task that exists offline: which standard-library module
does a docstring document (8 classes, labels from the data: embedded:stdlib-modules, 558 docstrings)?

Each docstring is also rendered to a 64x320 image (`kdcache render-text`), so one teacher pass serves both:
SmolLM2-135M-Instruct (trained for language modelling, never for this task, and never shown pixels) writes
one cache with the label, the image path and its mean-pooled last hidden state per docstring. Then, per seed,
with the teacher's embedding term (teacher_weight 1) and without it (0), on the same held-out docstrings:

- cross-task (recipe cross-task-kd): a token classifier student (2 blocks, width 128);
- cross-modal (recipe cross-modal-kd): a conv-net student on the pixels.

A linear probe on the teacher's embeddings (softmax regression on the training rows, the same split) says
what the embedding itself knows of the task.

    python benchmarks/cross_task.py [--work runs/cross-task] [--seeds 0,1,2] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.cache import holdout_fraction_filter, open_cache
from kdcache.config import build_config
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.render import render_dataset
from kdcache.pipeline.recipes import recipe_path
from kdcache.pipeline.smollm2 import smollm2_gguf
from kdcache.train.classify import ClassifyConfig, label_names, train_classifier


def linear_probe(cache_path: str, cfg: ClassifyConfig, column: str, steps: int = 500) -> float:
    """Held-out accuracy of softmax regression on the teacher's embeddings (standardised, L2 1e-3, full-batch Adam)."""
    cache = open_cache(cache_path)
    labels = {name: i for i, name in enumerate(label_names(cache, cfg.label_field))}
    held = holdout_fraction_filter(cfg.eval_fraction)
    rows = list(cache.stream(columns=["example_id", cfg.label_field, column]))
    x = torch.tensor(np.stack([r[column] for r in rows]), dtype=torch.float64)
    y = torch.tensor([labels[str(r[cfg.label_field])] for r in rows])
    test = torch.tensor([held(r["example_id"]) for r in rows])
    mu, sd = x[~test].mean(0), x[~test].std(0) + 1e-6
    x = (x - mu) / sd
    torch.manual_seed(0)
    w = torch.zeros(x.shape[1], len(labels), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(labels), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[~test] @ w + b, y[~test]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        opt.step()
    return float(((x[test] @ w + b).argmax(-1) == y[test]).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/cross-task")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--max-rows", type=int, default=None, help="a smoke run on the first N docstrings (default: all)")
    args = ap.parse_args()
    work = Path(args.work)
    pairs = work / "pairs"
    rows = render_dataset(DataConfig(source="embedded:stdlib-modules", max_rows=args.max_rows), pairs, progress=False)
    recipe = recipe_path("cross-modal-kd")  # its generate section = cross-task-kd's + the image field
    gen = build_config(GenerateConfig, recipe, {"teacher": str(smollm2_gguf()), "out": str(work / "cache"), "data.source": str(rows)}, [],
                       section="generate")
    t0 = time.perf_counter()
    m = generate(gen, progress=False)
    print(f"cache: {m.num_rows} rows, {m.num_tokens} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
    results: dict = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, weight, task in [(f"{t} {w}", weight, t) for t in ("cross-task", "cross-modal")
                                   for w, weight in (("with teacher", 1.0), ("no teacher", 0.0))]:
            values = {"cache": gen.out, "out": str(work / name.replace(" ", "-") / f"seed{seed}"), "seed": seed, "teacher_weight": weight,
                      **({"image.root": str(pairs)} if task == "cross-modal" else {}), **({"steps": args.steps} if args.steps else {})}
            cfg = build_config(ClassifyConfig, recipe_path(f"{task}-kd"), values, [], section="classify")
            t0 = time.perf_counter()
            final = train_classifier(cfg, progress=False)
            results[f"{name}@seed{seed}"] = {**final, "seconds": round(time.perf_counter() - t0)}
            print(json.dumps({f"{name}@seed{seed}": results[f"{name}@seed{seed}"]}), flush=True)
    column = f"pooled_{max(open_cache(gen.out).manifest.signals['pooled']['layers'])}"
    results["teacher linear probe"] = {"eval_accuracy": linear_probe(gen.out, cfg, column)}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    groups: dict[str, list[float]] = {}
    for key, r in results.items():
        groups.setdefault(key.split("@seed")[0], []).append(r["eval_accuracy"])
    lines = ["| row | held-out accuracy per seed | mean ± sd |", "|---|---|---:|"]
    for row, acc in groups.items():
        a = np.array(acc)
        sd = f"{a.std(ddof=1):.3f}" if len(a) > 1 else "—"
        lines.append(f"| {row} | {' / '.join(f'{x:.3f}' for x in a)} | {a.mean():.3f} ± {sd} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
