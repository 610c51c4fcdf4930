"""Reading a cache from s3:// against reading it from a local folder: peak memory and throughput, side by side.

An S3 API server (moto in server mode) runs on loopback in this process; each cache (0.1x, 1x, 10x a middle size) is
written locally, uploaded, then read end to end (shuffled stream, window of 4 row groups, batches of 8) from the
local folder and from s3:// in fresh subprocesses that report their resident memory after imports and their peak
(``VmHWM``). The server holds the objects in its own (this process's) memory, so the children's numbers are the
reader's alone. Loopback is not a real network: the throughput ratio says what the fsspec path costs in CPU, not
what a bucket across a network delivers.

    python benchmarks/bench_object_store.py [--middle 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from common import synthetic_examples, synthetic_topk

from kdcache.cache import CacheWriter, make_signals

CHILD = r"""
import json, sys, time
from kdcache.cache import open_cache
from kdcache.train.data import batches

def status(key):  # /proc values of this process only
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

base = status("VmRSS")
n, t0 = 0, time.perf_counter()
for b in batches(open_cache(sys.argv[1]).stream(shuffle=True, seed=0, window=4), batch_size=8):
    n += b.input_ids.numel()
seconds = time.perf_counter() - t0
print(json.dumps({"tokens_read": n, "rss_after_imports_mib": round(base, 1), "peak_rss_mib": round(status("VmHWM"), 1),
                  "tokens_per_s": round(n / seconds)}))
"""


def read(path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    r["reader_mib"] = round(r["peak_rss_mib"] - r["rss_after_imports_mib"], 1)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--middle", type=int, default=200_000)
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args()
    import logging

    from moto.server import ThreadedMotoServer
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    fs = s3fs.S3FileSystem(use_listings_cache=False)
    fs.mkdir("bench")
    pool = synthetic_topk(60_000)
    root = Path(tempfile.mkdtemp(prefix="kdcache-s3-"))
    rows = []
    try:
        for scale in (0.1, 1, 10):
            n_ex = max(int(args.middle * scale) // args.length, 1)
            out = root / f"x{scale}"
            w = CacheWriter(out, {"scale": scale}, make_signals(64, 49_152))
            for i, ex in enumerate(synthetic_examples(n_ex, args.length, pool)):
                w.add_row([ex], i + 1)
            m = w.close()
            fs.put(str(out), f"bench/x{scale}", recursive=True)
            local, remote = read(str(out)), read(f"s3://bench/x{scale}")
            assert local["tokens_read"] == remote["tokens_read"] == m.num_tokens
            rows.append({"scale": scale, "tokens": m.num_tokens, "cache_mib": round(m.num_bytes / 2**20, 1),
                         "local": local, "s3": remote,
                         "s3_over_local_peak": round(remote["peak_rss_mib"] / local["peak_rss_mib"], 3),
                         "s3_over_local_speed": round(remote["tokens_per_s"] / local["tokens_per_s"], 3)})
            shutil.rmtree(out)
            fs.rm(f"bench/x{scale}", recursive=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        server.stop()
    peaks = [r["s3"]["peak_rss_mib"] for r in rows]
    print(json.dumps({"rows": rows, "s3_peak_rss_spread": round(max(peaks) / min(peaks) - 1, 3)}, indent=2))


if __name__ == "__main__":
    main()
