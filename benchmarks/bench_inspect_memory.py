"""Peak memory of `kdcache inspect` and `kdcache verify` (and --deep) for caches 10x smaller and 10x larger than a
middle size, beside the all-rows way inspect used to gather its statistics (every row group's NLL, entropy and
loss-token columns concatenated, then numpy over them).

Each size is written once with CacheWriter (synthetic short examples, top-4, so a cache has many rows: inspect's
statistics are per example), then each job runs in a fresh subprocess that reports its peak RSS minus its RSS
after imports (/proc/self/status VmHWM - VmRSS), i.e. the job's own memory.

    python benchmarks/bench_inspect_memory.py [--middle-rows 100000] [--length 16] [--shard-tokens 100000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import synthetic_topk

from kdcache.cache import CacheWriter, make_signals

CHILD = r"""
import json, sys
import numpy as np
from kdcache.cache import open_cache
from kdcache.cache.verify import verify_cache
from kdcache.cli.inspect_cache import summarize

def status(key):  # /proc values of this process only
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

job, path = sys.argv[1], sys.argv[2]
base = status("VmRSS")
if job == "inspect":
    s = summarize(path)
    out = s["teacher_nll_per_example"]
elif job == "all_rows":  # what inspect did before it streamed: every row's statistics in memory at once
    cache = open_cache(path, verify_sha256=False)
    cols = ["teacher_nll", "teacher_entropy", "num_loss_tokens"]
    blocks = [cache.read_block(g, cols).scalars for g in range(len(cache.row_groups))]
    nll, ent, n = (np.concatenate([b[c] for b in blocks]) for c in cols)
    out = {"mean": float(nll.mean()), "p10": float(np.percentile(nll, 10)), "p50": float(np.median(nll)), "p90": float(np.percentile(nll, 90))}
else:
    r = verify_cache(path, deep=job == "verify_deep")
    assert r.ok
    out = {"row_groups_decoded": sum(s.row_groups_decoded for s in r.shards)}
print(json.dumps({"result": out, "job_mib": round(status("VmHWM") - base, 1), "peak_rss_mib": round(status("VmHWM"), 1)}))
"""

JOBS = ("inspect", "all_rows", "verify", "verify_deep")


def write_cache(out: Path, n_rows: int, length: int, pool, shard_tokens: int, seed: int = 0):
    ids, lps, tails = pool
    rng = np.random.default_rng(seed)
    w = CacheWriter(out, {"rows": n_rows}, make_signals(4, 49_152), shard_tokens=shard_tokens)
    batch = []
    for e in range(n_rows):
        off = int(rng.integers(0, len(ids) - length))
        batch.append({
            "example_id": str(e), "input_ids": rng.integers(0, 49_152, length, dtype=np.int32),
            "loss_mask": np.ones(length - 1, dtype=bool), "topk_ids": ids[off:off + length - 1],
            "topk_logprobs": lps[off:off + length - 1], "tail_logprob": tails[off:off + length - 1],
            "teacher_nll": float(rng.gamma(2.0, 1.5)), "teacher_entropy": float(rng.gamma(3.0, 1.0)), "num_loss_tokens": length - 1,
        })
        if len(batch) == 2000:
            w.add_row(batch, e + 1)
            batch = []
    if batch:
        w.add_row(batch, n_rows)
    return w.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--middle-rows", type=int, default=100_000)
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--shard-tokens", type=int, default=100_000, help="so every size has full shards: a footer grows with its shard")
    args = ap.parse_args()
    pool = synthetic_topk(20_000, k=4)
    root = Path(tempfile.mkdtemp(prefix="kdcache-inspect-mem-"))
    rows = []
    try:
        for scale in (0.1, 1, 10):
            out = root / f"x{scale}"
            m = write_cache(out, int(args.middle_rows * scale), args.length, pool, args.shard_tokens)
            row = {"scale": scale, "rows": m.num_rows, "tokens": m.num_tokens, "cache_mib": round(m.num_bytes / 2**20, 1), "shards": len(m.shards)}
            for job in JOBS:
                r = json.loads(subprocess.run([sys.executable, "-c", CHILD, job, str(out)], capture_output=True, text=True, check=True).stdout)
                row[f"{job}_mib"] = r["job_mib"]
                if job in ("inspect", "all_rows"):
                    row[f"{job}_p50"] = r["result"]["p50"]
            assert np.isclose(row["inspect_p50"], row["all_rows_p50"], rtol=1e-6)  # the same median (the old way in float32)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    spread = {job: round(rows[-1][f"{job}_mib"] / max(rows[0][f"{job}_mib"], 0.1), 2) for job in JOBS}
    print(json.dumps({"rows": rows, "job_mib_at_10x_over_0.1x": spread}, indent=2))


if __name__ == "__main__":
    main()
