"""vLLM vs transformers teacher backends, and kdcache's capture overhead over a bare vLLM call.

Throughput (default mode), in one process, each teacher loaded once (start-up is not timed):
  - bare vLLM: ``LLM.generate`` over the pre-tokenised rows with the same log-probability settings
    (prompt_logprobs=k, flat, no detokenisation), results discarded;
  - kdcache generate, backend vllm: read + tokenise the dataset, score, write the cache;
  - kdcache generate, backend transformers.
Bare and kdcache runs alternate ``--repeats`` times; the overhead is the median ratio.

Parity (``--parity``): both backends over the same rows in ``--dtype``; quantiles of the differences.

Memory (``--memory``): generate over N and 10*N rows in fresh processes; reports the peak RSS of the
kdcache process and of its whole process tree (vLLM's engine and worker processes included).

    python benchmarks/bench_vllm.py --model smollm2 --rows 200 --max-length 256
    python benchmarks/bench_vllm.py --model smollm2 --memory --rows 40 --max-length 64 --inflight-tokens 4096
    python benchmarks/bench_vllm.py --model smollm2 --parity --dtype bfloat16 --rows 32
    python benchmarks/bench_vllm.py --model random-llama-1b ...   # GPU: random-init weights, realistic shape

Runs unchanged on a GPU (vLLM picks CUDA; dtype auto = bf16 there). Without vLLM installed only the
transformers backend is measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

from kdcache.pipeline.config import DataConfig, GenerateConfig, VLLMConfig
from kdcache.pipeline.data import RowTokenizer, Tokenized, iter_rows
from kdcache.pipeline.generate import generate
from kdcache.pipeline.teachers import build_teacher
from kdcache.pipeline.teachers.vllm_backend import vllm_available

RANDOM_LLAMAS = {  # Llama-3.2-1B and Llama-3.1-8B shapes
    "random-llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "random-llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}


def prepare_model(name: str, work: Path, dtype: str) -> str:
    """A model folder vLLM and transformers both load: a path, the embedded SmolLM2, or a random Llama."""
    if name == "smollm2":
        from kdcache.pipeline.convert import convert_model
        from kdcache.pipeline.smollm2 import smollm2_gguf

        return str(convert_model(str(smollm2_gguf()), work / f"smollm2-{dtype}", dtype=dtype))
    if name in RANDOM_LLAMAS:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from kdcache.pipeline.smollm2 import smollm2_gguf
        from kdcache.pipeline.teachers.transformers_backend import load_tokenizer

        out = work / name
        if not (out / "config.json").exists():
            tok = load_tokenizer(str(smollm2_gguf()))  # real text -> ids; the model's vocab is Llama-3's
            cfg = LlamaConfig(vocab_size=128_256, max_position_embeddings=8192, tie_word_embeddings=False,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **RANDOM_LLAMAS[name])
            torch.manual_seed(0)
            LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(out)
            tok.save_pretrained(out)
        return str(out)
    return name


def sequences(cfg: GenerateConfig, tokenizer) -> list:
    tok = RowTokenizer(tokenizer, cfg.data)
    rows = iter_rows(cfg.data)
    first = next(rows)
    tok.resolve_format(first)
    return [t.input_ids for t in map(tok, itertools.chain([first], rows)) if isinstance(t, Tokenized)]


def bare_vllm(teacher, seqs, k: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(prompt_logprobs=k, max_tokens=1, detokenize=False, flat_logprobs=True)
    prompts = [TokensPrompt(prompt_token_ids=s.tolist()) for s in seqs]
    t0 = time.perf_counter()
    outs = teacher.llm.generate(prompts, sp, use_tqdm=False)
    seconds = time.perf_counter() - t0
    del outs
    return seconds


def timed_generate(cfg: GenerateConfig, teacher, out: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    m = generate(GenerateConfig(**{**cfg.__dict__, "out": str(out), "overwrite": True}), progress=False, teacher=teacher)
    return time.perf_counter() - t0, m.num_tokens


def throughput(args, model: str, work: Path) -> dict:
    data = DataConfig(source=args.dataset, max_rows=args.rows, max_length=args.max_length)
    results: dict = {}
    backends = ["vllm", "transformers"] if vllm_available() else ["transformers"]
    for backend in backends:
        if args.skip_transformers and backend == "transformers":
            continue
        cfg = GenerateConfig(teacher=model, backend=backend, out="", top_k=args.top_k, dtype=args.dtype, batch_tokens=args.batch_tokens,
                             data=data, vllm=VLLMConfig(gpu_memory_utilization=args.gpu_memory_utilization))
        teacher = build_teacher(cfg)
        t0 = time.perf_counter()
        teacher.load()
        load_s = time.perf_counter() - t0
        seqs = sequences(cfg, teacher.tokenizer)
        n_tokens = sum(len(s) for s in seqs)
        timed_generate(GenerateConfig(**{**cfg.__dict__, "data": DataConfig(**{**data.__dict__, "max_rows": 8})}), teacher, work / "warmup")
        runs = []
        for r in range(args.repeats):
            row = {}
            if backend == "vllm":
                row["bare_s"] = bare_vllm(teacher, seqs, args.top_k)
            row["kdcache_s"], written = timed_generate(cfg, teacher, work / f"{backend}-{r}")
            assert written == n_tokens, (written, n_tokens)
            runs.append(row)
            print(json.dumps({"backend": backend, "repeat": r, **{k: round(v, 2) for k, v in row.items()}}), flush=True)
        teacher.close()
        res = {"load_s": round(load_s, 1), "rows": len(seqs), "tokens": n_tokens,
               "kdcache_tok_s": round(n_tokens / statistics.median(r["kdcache_s"] for r in runs))}
        if backend == "vllm":
            ratios = [r["kdcache_s"] / r["bare_s"] for r in runs]
            res["bare_tok_s"] = round(n_tokens / statistics.median(r["bare_s"] for r in runs))
            res["overhead_pct"] = round(100 * (statistics.median(ratios) - 1), 1)
            res["overhead_pct_each"] = [round(100 * (x - 1), 1) for x in ratios]
        results[backend] = res
    return results


def parity(args, model: str, work: Path) -> dict:
    """Both backends over the same rows in ``--dtype``; distribution of |log-prob difference| at the
    top-k values (sorted, so ties do not matter) and of the tail mass."""
    import numpy as np

    from kdcache.cache import open_cache

    data = DataConfig(source=args.dataset, max_rows=args.rows, max_length=args.max_length)
    for backend in ("transformers", "vllm"):
        generate(GenerateConfig(teacher=model, backend=backend, out=str(work / f"parity-{backend}"), overwrite=True, top_k=args.top_k,
                                dtype=args.dtype, logprob_codec="fp32", data=data), progress=False)
    rows = {b: {e["example_id"]: e for e in open_cache(work / f"parity-{b}").stream()} for b in ("transformers", "vllm")}
    a, b = rows["transformers"], rows["vllm"]
    vals = np.concatenate([np.abs(a[k]["topk_logprobs"] - b[k]["topk_logprobs"]).ravel() for k in a])
    tails = np.concatenate([np.abs(np.exp(a[k]["tail_logprob"]) - np.exp(b[k]["tail_logprob"])) for k in a])
    ids = np.mean([np.mean(a[k]["topk_ids"][:, 0] == b[k]["topk_ids"][:, 0]) for k in a])
    q = lambda x: {"median": float(np.median(x)), "p99": float(np.quantile(x, 0.99)), "p99.9": float(np.quantile(x, 0.999)), "max": float(x.max())}
    return {"dtype": args.dtype, "values": q(vals), "tail_mass": q(tails), "top1_same": float(ids), "positions": int(sum(len(e["tail_logprob"]) for e in a.values()))}


MEMORY_CHILD = r"""
import json, sys, threading, time, psutil
from kdcache.pipeline.config import DataConfig, GenerateConfig, VLLMConfig
from kdcache.pipeline.generate import generate
me = psutil.Process()
peak = {"self": 0, "tree": 0}
def sample():
    while True:
        try:
            procs = [me] + me.children(recursive=True)
            rss = [p.memory_info().rss for p in procs]
            peak["self"] = max(peak["self"], rss[0]); peak["tree"] = max(peak["tree"], sum(rss))
        except psutil.Error:
            pass
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
model, backend, source, rows, max_length, k, out, inflight = sys.argv[1:9]
m = generate(GenerateConfig(teacher=model, backend=backend, out=out, overwrite=True, top_k=int(k), vllm=VLLMConfig(inflight_tokens=int(inflight)),
             data=DataConfig(source=source, max_rows=int(rows), max_length=int(max_length))), progress=False)
time.sleep(0.2)
print(json.dumps({"rows": m.num_rows, "tokens": m.num_tokens, "peak_self_mib": round(peak["self"] / 2**20),
                  "peak_tree_mib": round(peak["tree"] / 2**20)}))
"""


def memory(args, model: str, work: Path) -> dict:
    out = {}
    backend = "vllm" if vllm_available() else "transformers"
    for rows in (args.rows, 10 * args.rows):
        r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, model, backend, args.dataset, str(rows), str(args.max_length),
                            str(args.top_k), str(work / f"mem-{rows}"), str(args.inflight_tokens)], capture_output=True, text=True, check=True)
        out[rows] = json.loads(r.stdout.strip().splitlines()[-1])
        print(json.dumps({"backend": backend, **out[rows]}), flush=True)
    return {"backend": backend, "runs": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, random-llama-1b, random-llama-8b, or a model folder")
    ap.add_argument("--dataset", default="embedded:stdlib-docs")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6, help="leaves room for the transformers run in the same process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inflight-tokens", type=int, default=65536, help="vllm.inflight_tokens in --memory mode")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--memory", action="store_true", help="peak RSS at --rows and 10x --rows instead of throughput")
    ap.add_argument("--parity", action="store_true", help="log-prob differences between the backends in --dtype instead of throughput")
    ap.add_argument("--work", default=None, help="folder for converted models and caches (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="kdcache-bench-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    dtype = "float32" if args.dtype == "auto" and not torch.cuda.is_available() else ("bfloat16" if args.dtype == "auto" else args.dtype)
    model = prepare_model(args.model, work, dtype)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else machine()
    print(f"# {device}; model {args.model}; k={args.top_k}; max_length {args.max_length}; rows {args.rows}", flush=True)
    mode = memory if args.memory else parity if args.parity else throughput
    result = mode(args, model, work)
    print(json.dumps({"device": device, "model": args.model, "args": vars(args), "result": result}, indent=1))


if __name__ == "__main__":
    main()
