"""Does the teacher wait for the writer? Whole `generate` with the writer thread, with writing inline in the
teacher's thread, and the teacher alone (the same generate with the writer's add_row reduced to counting rows:
tokenisation, forwards and top-k capture, nothing encoded or written), side by side in one process.

SmolLM2-135M-Instruct (transformers backend, the embedded GGUF) scores embedded stdlib docstrings; the modes
alternate (--repeats) so machine noise hits all three; each run writes a fresh cache.

    python benchmarks/bench_writer_overlap.py [--rows 128] [--max-length 256] [--top-k 64] [--codec lists] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import machine
from kdcache.cache import CacheWriter
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.smollm2 import smollm2_gguf
from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher


def counting_only(self, examples, input_rows_end):
    self.rows_added += len(examples)  # what generate checks; nothing is encoded or written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--codec", default="lists")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    teacher = TransformersTeacher(str(smollm2_gguf()), device="cpu", dtype="float32")
    teacher.load()
    data = DataConfig(source="embedded:stdlib-docs", max_rows=args.rows, max_length=args.max_length)
    root = Path(tempfile.mkdtemp(prefix="kdcache-overlap-"))
    modes = {"teacher_alone": 256, "inline": 0, "writer_thread": 256}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    tokens = 0
    real_add_row = CacheWriter.add_row
    try:
        for r in range(args.repeats):
            for mode, queue in modes.items():
                CacheWriter.add_row = counting_only if mode == "teacher_alone" else real_add_row
                cfg = GenerateConfig(teacher=str(smollm2_gguf()), out=str(root / f"{mode}-{r}"), top_k=args.top_k, data=data,
                                     codec=args.codec, write_queue=queue, overwrite=True)
                t0 = time.perf_counter()
                m = generate(cfg, progress=False, teacher=teacher)
                seconds[mode].append(time.perf_counter() - t0)
                tokens = max(tokens, m.num_tokens)
                shutil.rmtree(root / f"{mode}-{r}")
    finally:
        CacheWriter.add_row = real_add_row
        teacher.close()
        shutil.rmtree(root, ignore_errors=True)
    alone = statistics.median(seconds["teacher_alone"])
    print(json.dumps({
        "machine": machine(), "rows": args.rows, "tokens": tokens, "top_k": args.top_k, "codec": args.codec,
        **{f"{m}_s": round(statistics.median(s), 2) for m, s in seconds.items()},
        **{f"{m}_over_teacher_alone": round(statistics.median(s) / alone - 1, 3) for m, s in seconds.items() if m != "teacher_alone"},
    }, indent=2))


if __name__ == "__main__":
    main()
