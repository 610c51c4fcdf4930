"""8 students training from one cache at once: each process's peak memory against one student trained alone.

A real cache (a random 2-layer Llama teacher over generated sentences, the transformers backend), then the same
short `train()` run (tiny student from the spec, 1 torch thread) in 1 process, then in N processes started
together, each with its own seed and run directory. Every process reports from /proc/self/status its peak RSS
(VmHWM), its RSS after imports, and at the end RssAnon (private memory) and RssFile (file pages mapped into it:
the shared libraries and any mapped Parquet/page cache it touches), so a difference can be traced to its kind.

    python benchmarks/many_readers.py [--students 8] [--steps 40] [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.time()
from kdcache.train import StudentConfig, TrainConfig, train

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) / 1024
    return out

after_imports = status()["VmRSS"]
cfg = json.loads(sys.argv[1])
student = StudentConfig(**cfg.pop("student"))
final = train(TrainConfig(**cfg, student=student), progress=False)
s = status()
print(json.dumps({"peak_rss_mib": round(s["VmHWM"], 1), "after_imports_mib": round(after_imports, 1),
                  "own_mib": round(s["VmHWM"] - after_imports, 1), "rss_anon_mib": round(s["RssAnon"], 1),
                  "rss_file_mib": round(s["RssFile"], 1), "eval_ppl": final.get("eval_ppl"), "seconds": round(time.time() - t0, 1)}))
"""

WORDS = ("the a of to in and is was for on with as by at from that this it be are or not have has which function returns "
         "value list string file object class method name data type default error number module argument result").split()


def build_cache(root: Path, rows: int) -> Path:
    """A tokenizer, a random teacher and its top-8 cache of ``rows`` sentences (seconds on CPU)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kdcache.pipeline.config import DataConfig, GenerateConfig
    from kdcache.pipeline.generate import generate

    teacher = root / "teacher"
    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "<s>", "</s>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=256, pad_token_id=1, bos_token_id=2, eos_token_id=3)
                     ).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    rng = random.Random(0)
    data = root / "text.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))}) + "\n" for _ in range(rows)))
    cache = root / "cache"
    generate(GenerateConfig(teacher=str(teacher), out=str(cache), top_k=8, row_group_tokens=4096,
                            data=DataConfig(source=str(data), max_length=64)), progress=False)
    return cache


def run_students(cache: Path, runs: Path, n: int, steps: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    procs = []
    for i in range(n):
        cfg = {"cache": str(cache), "out": str(runs / f"student-{i}"), "steps": steps, "batch_size": 8, "seed": i, "loss": "kd",
               "alpha": 0.5, "eval_every": 0, "save_every": 0, "log_every": 10, "device": "cpu", "precision": "fp32",
               "student": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128}}
        procs.append(subprocess.Popen([sys.executable, "-c", "import torch; torch.set_num_threads(1)\n" + CHILD, json.dumps(cfg)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode:
            raise SystemExit(f"a student failed ({p.returncode}): {stderr.strip().splitlines()[-1] if stderr.strip() else ''}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--students", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=2000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kdcache-readers-"))
    try:
        t0 = time.time()
        cache = build_cache(root, args.rows)
        from kdcache.cache import open_cache

        m = open_cache(cache).manifest
        alone = run_students(cache, root / "alone", 1, args.steps)[0]
        t1 = time.time()
        together = run_students(cache, root / "together", args.students, args.steps)
        t2 = time.time()
        peaks = [r["peak_rss_mib"] for r in together]
        own = [r["own_mib"] for r in together]
        print(json.dumps({
            "cache": {"rows": m.num_rows, "tokens": m.num_tokens, "mib": round(m.num_bytes / 2**20, 2), "row_groups": sum(len(s.row_group_rows) for s in m.shards) if hasattr(m.shards[0], "row_group_rows") else None},
            "alone": alone, "together": together,
            "peak_ratio_mean": round(statistics.mean(peaks) / alone["peak_rss_mib"], 3),
            "peak_ratio_max": round(max(peaks) / alone["peak_rss_mib"], 3),
            "own_ratio_mean": round(statistics.mean(own) / alone["own_mib"], 3),
            "own_ratio_max": round(max(own) / alone["own_mib"], 3),
            "seconds": {"cache": round(t1 - t0 - alone["seconds"], 1), "alone": alone["seconds"], "together_wall": round(t2 - t1, 1)},
        }, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
