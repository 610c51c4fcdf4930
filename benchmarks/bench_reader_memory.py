"""Peak writer and reader memory for caches 10x smaller and 10x larger than a middle size.

Each size is written in a fresh subprocess (synthetic examples made on the fly, so only the writer holds
data), then read end to end (the trainer's path: shuffled stream -> torch batches) in another; each reports
its peak RSS and the RSS after imports; the difference is the writer's or reader's own memory.

    python benchmarks/bench_reader_memory.py [--middle 200000] [--topk-codec lists]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


STATUS = r"""
import json, sys
def status(key):  # /proc values of this process only (ru_maxrss would include the parent's pre-exec peak)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
"""

CHILD = STATUS + r"""
from kdcache.cache import open_cache
from kdcache.train.data import batches
import torch

base = status("VmRSS")
n = 0
for b in batches(open_cache(sys.argv[1], topk_order="any", keep_float16=True).stream(shuffle=True, seed=0, window=4), batch_size=8):
    n += b.input_ids.numel()
print(json.dumps({"tokens_read": n, "rss_after_imports_mib": round(base, 1), "peak_rss_mib": round(status("VmHWM"), 1)}))
"""

WRITER = STATUS + r"""
sys.path.insert(0, sys.argv[5])
from common import synthetic_examples, synthetic_topk
from kdcache.cache import CacheWriter, make_signals

pool = synthetic_topk(60_000)  # its peak (the full-vocabulary softmax) is not the writer's:
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
base = status("VmRSS")
w = CacheWriter(sys.argv[1], {"scale": sys.argv[2]}, make_signals(64, 49_152, topk_codec=sys.argv[4]))
for i, ex in enumerate(synthetic_examples(int(sys.argv[3]), 512, pool)):
    w.add_row([ex], i + 1)
m = w.close()
print(json.dumps({"tokens": m.num_tokens, "bytes": m.num_bytes, "rss_after_setup_mib": round(base, 1), "peak_rss_mib": round(status("VmHWM"), 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--middle", type=int, default=200_000)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--topk-codec", default="lists")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kdcache-mem-"))
    rows = []
    try:
        for scale in (0.1, 1, 10):
            n_ex = max(int(args.middle * scale) // args.length, 1)
            out = root / f"x{scale}"
            here = str(Path(__file__).resolve().parent)
            wr = json.loads(subprocess.run([sys.executable, "-c", WRITER, str(out), str(scale), str(n_ex), args.topk_codec, here],
                                           capture_output=True, text=True, check=True).stdout)
            r = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, check=True).stdout)
            r.update({"scale": scale, "tokens": wr["tokens"], "cache_mib": round(wr["bytes"] / 2**20, 1),
                      "reader_mib": round(r["peak_rss_mib"] - r["rss_after_imports_mib"], 1),
                      "writer_peak_rss_mib": wr["peak_rss_mib"], "writer_mib": round(wr["peak_rss_mib"] - wr["rss_after_setup_mib"], 1)})
            rows.append(r)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peaks = [r["peak_rss_mib"] for r in rows]
    wpeaks = [r["writer_peak_rss_mib"] for r in rows]
    print(json.dumps({"topk_codec": args.topk_codec, "rows": rows, "reader_peak_rss_spread": round(max(peaks) / min(peaks) - 1, 3),
                      "writer_peak_rss_spread": round(max(wpeaks) / min(wpeaks) - 1, 3)}, indent=2))


if __name__ == "__main__":
    main()
