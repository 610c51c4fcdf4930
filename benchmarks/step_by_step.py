"""Distilling step-by-step on generated word problems: does learning the teacher's rationales as a second task
make a student answer better, without writing a rationale, than answer-only distillation?

The teacher (SmolLM2-135M-Instruct) reads the few-shot context of recipe step-by-step and writes a rationale
for each of the 600 training problems of embedded:word-problems (cache S also holds the answer rows, the true
answers scored by the teacher); cache A holds the answer rows alone. Students with the demo's settings and the
recipe's loss train the same number of steps on each, and answer the 300 held-out problems of
embedded:word-problems-test greedily after "[answer] ...": exact-match accuracy. A third row trains on cache S with
only the rationales whose answer is right (rationale filtering: cache S's rows rewritten without the wrong ones,
by this script, not by the teacher). The teacher's own accuracy is
measured the same way, with the context: answering directly, and writing a rationale first (its upper bound as a
rationale source); the rationale rows of cache S give its accuracy on the training problems.

    python benchmarks/step_by_step.py [--work runs/step-by-step] [--seeds 0,1,2] [--steps 600] [--teacher-rows 100]
                                      [--backend vllm --teacher runs/teacher-fp32]   (a folder from `kdcache convert`)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import yaml

from kdcache.cache import open_cache
from kdcache.cli.answers import answer_accuracy
from kdcache.cli.demo import DemoConfig
from kdcache.config import build_config
from kdcache.pipeline.config import GenerateConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.recipes import recipe_path
from kdcache.pipeline.smollm2 import smollm2_gguf
from kdcache.pipeline.word_problems import ANSWER_PATTERN, ANSWER_PREFIX, RATIONALE_PREFIX
from kdcache.train.loop import train

TEST = "embedded:word-problems-test"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/step-by-step")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--teacher-rows", type=int, default=100, help="held-out problems the teacher answers (it is slow)")
    ap.add_argument("--teacher", default="", help="teacher for generate (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--backend", default="transformers", help="generate's backend (vllm needs a model folder: kdcache convert)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(recipe_path("step-by-step").read_text())
    teacher = str(smollm2_gguf())
    values = {"teacher": args.teacher or teacher, "backend": args.backend, "device": "cpu"}
    if args.backend == "vllm":
        values["vllm"] = {"max_model_len": 512}
    base = build_config(GenerateConfig, recipe_path("step-by-step"), values, section="generate")
    caches = {"step-by-step": dataclasses.replace(base, out=str(work / "cache-sbs")),
              "answer-only": dataclasses.replace(base, out=str(work / "cache-answers"),
                                                 data=dataclasses.replace(base.data, where={"task": "answer"}))}
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name, cfg in caches.items():
        t0 = time.perf_counter()
        m = generate(cfg, progress=False)
        print(f"{cfg.out}: {m.num_rows} rows, {m.num_tokens} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
    results["teacher-rationales-on-train"] = rationale_accuracy(caches["step-by-step"].out)
    context = recipe["generate"]["context"]
    for key, prefix in (("teacher-direct", ANSWER_PREFIX), ("teacher-with-rationale", RATIONALE_PREFIX)):
        if key not in results:
            rows_prefix = {"prompt_field": "rationale_prompt"} if prefix == RATIONALE_PREFIX else {}
            results[key] = teacher_accuracy(teacher, context, args.teacher_rows, prefix, **rows_prefix)
            print(json.dumps({key: results[key]}), flush=True)
    demo = DemoConfig()
    filtered = work / "cache-sbs-correct"
    results["rationales-kept"] = keep_correct_rationales(caches["step-by-step"].out, filtered)
    runs = {**{name: cfg.out for name, cfg in caches.items()}, "step-by-step (correct rationales)": str(filtered)}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, cache in runs.items():
            key = f"{name}@seed{seed}"
            if key in results:
                continue
            out = work / ("step-by-step-correct" if "correct" in name else name) / f"seed{seed}"
            tcfg = dataclasses.replace(demo.train, cache=cache, out=str(out), seed=seed, steps=args.steps,
                                       **{k: v for k, v in recipe["train"].items()})
            t0 = time.perf_counter()
            final = train(tcfg, progress=False)
            acc = answer_accuracy(str(out / "final"), TEST, show=2)
            results[key] = {"accuracy": acc["accuracy"], "answered": acc["answered"], "eval_ppl": final.get("eval_ppl"),
                            "seconds": round(time.perf_counter() - t0), "examples": acc["examples"]}
            print(json.dumps({key: results[key]}), flush=True)
            results_path.write_text(json.dumps(results, indent=2))
    results_path.write_text(json.dumps(results, indent=2))
    print(table(results))


def _teacher_answer(tok, ex) -> str | None:
    found = re.search(ANSWER_PATTERN, tok.decode(ex["input_ids"][int(ex["prompt_length"]):], skip_special_tokens=True))
    return found.group(1) if found else None


def keep_correct_rationales(src: str, out: Path) -> dict:
    """Cache S without the rationale rows whose answer is wrong (the answer rows all kept), rows as they are."""
    from transformers import AutoTokenizer

    from kdcache.cache import CacheWriter

    cache = open_cache(src)
    tok = AutoTokenizer.from_pretrained(Path(src) / "_tokenizer")
    m = cache.manifest
    w = CacheWriter(out, {**m.settings, "filtered": "rationale rows whose answer is the true one (benchmarks/step_by_step.py)"},
                    m.signals, created_by="benchmarks/step_by_step.py")
    kept = total = 0
    if not w.complete:
        import shutil

        shutil.copytree(Path(src) / "_tokenizer", out / "_tokenizer", dirs_exist_ok=True)
        for i, ex in enumerate(cache.stream()):
            ok = ex["task"] != "rationale" or _teacher_answer(tok, ex) == ex["answer"]
            total += ex["task"] == "rationale"
            kept += ok and ex["task"] == "rationale"
            w.add_row([ex] if ok else [], i + 1)
        w.close()
    return {"rationale_rows_kept": kept, "of": total}


def rationale_accuracy(cache_dir: str) -> dict:
    """How often the teacher's written rationale ends in the true answer (the training problems of cache S)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(cache_dir) / "_tokenizer")
    hits = total = with_steps = 0
    for ex in open_cache(cache_dir).stream(columns=["example_id", "input_ids", "prompt_length", "task", "answer"]):
        if ex["task"] != "rationale":
            continue
        text = tok.decode(ex["input_ids"][int(ex["prompt_length"]):], skip_special_tokens=True)
        hits += _teacher_answer(tok, ex) == ex["answer"]
        with_steps += " = " in text
        total += 1
    return {"accuracy": hits / total, "rows": total, "with_a_calculation": with_steps / total}


def teacher_accuracy(teacher: str, context: str, rows: int, prefix: str, prompt_field: str = "prompt") -> dict:
    """The teacher on held-out problems after the recipe's context: asked for the answer, or for a rationale first."""
    import tempfile

    from kdcache.pipeline.config import DataConfig
    from kdcache.pipeline.data import iter_rows
    from kdcache.pipeline.word_problems import prompt

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps({**r, "rationale_prompt": prompt(prefix, r["question"])}) + "\n"
                                for r in iter_rows(DataConfig(source=TEST, max_rows=rows))))
        acc = answer_accuracy(teacher, str(path), prompt_field=prompt_field, context=context, max_new_tokens=40, batch_size=8, show=2)
    return {k: acc[k] for k in ("accuracy", "answered", "rows", "examples")}


def table(results: dict) -> str:
    sd = (lambda a: a.std(ddof=1) if len(a) > 1 else float("nan"))
    lines = ["| student (demo settings) | held-out accuracy per seed | mean ± sd | answered |", "|---|---|---:|---:|"]
    for name in ("answer-only", "step-by-step", "step-by-step (correct rationales)"):
        rs = [r for k, r in results.items() if k.startswith(f"{name}@seed")]
        if not rs:
            continue
        acc = np.array([r["accuracy"] for r in rs])
        ans = np.array([r["answered"] for r in rs])
        lines.append(f"| {name} | {' / '.join(f'{x:.3f}' for x in acc)} | {acc.mean():.3f} ± {sd(acc):.3f} | {ans.mean():.2f} |")
    for key in ("teacher-direct", "teacher-with-rationale", "teacher-rationales-on-train"):
        if key in results:
            r = results[key]
            lines.append(f"| {key} ({r['rows']} problems) | {r['accuracy']:.3f} | | {r.get('answered', float('nan')):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
