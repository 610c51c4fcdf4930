"""Peak reader memory for caches 10x smaller and 10x larger than a middle size.

Each size is written once, then read end to end (shuffled stream -> torch batches) in a fresh
subprocess that reports its peak RSS and the RSS after imports; the difference is the reader's own
memory.

    python benchmarks/bench_reader_memory.py [--middle 200000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import synthetic_examples, synthetic_topk

from kdcache.cache import CacheWriter, make_signals

CHILD = r"""
import json, sys
from kdcache.cache import open_cache
from kdcache.train.data import batches
import torch

def status(key):  # /proc values of this process only (ru_maxrss would include the parent's pre-exec peak)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

base = status("VmRSS")
n = 0
for b in batches(open_cache(sys.argv[1]).stream(shuffle=True, seed=0, window=4), batch_size=8):
    n += b.input_ids.numel()
print(json.dumps({"tokens_read": n, "rss_after_imports_mib": round(base, 1), "peak_rss_mib": round(status("VmHWM"), 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--middle", type=int, default=200_000)
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args()
    pool = synthetic_topk(60_000)
    root = Path(tempfile.mkdtemp(prefix="kdcache-mem-"))
    rows = []
    try:
        for scale in (0.1, 1, 10):
            n_ex = max(int(args.middle * scale) // args.length, 1)
            out = root / f"x{scale}"
            w = CacheWriter(out, {"scale": scale}, make_signals(64, 49_152))
            for i, ex in enumerate(synthetic_examples(n_ex, args.length, pool)):
                w.add_row([ex], i + 1)
            m = w.close()
            r = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, check=True).stdout)
            r.update({"scale": scale, "tokens": m.num_tokens, "cache_mib": round(m.num_bytes / 2**20, 1),
                      "reader_mib": round(r["peak_rss_mib"] - r["rss_after_imports_mib"], 1)})
            rows.append(r)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peaks = [r["peak_rss_mib"] for r in rows]
    print(json.dumps({"rows": rows, "peak_rss_spread": round(max(peaks) / min(peaks) - 1, 3)}, indent=2))


if __name__ == "__main__":
    main()
