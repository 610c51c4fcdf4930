"""Peak memory of the KD term: grows with the chunk, not with tokens x vocab.

Each configuration runs in a fresh process: student logits [N, V] (fp32, requires grad) and top-64
targets are made first; then one forward + backward of the loss. Reported: the peak RSS during the loss
minus the RSS before it, minus the logits' gradient (N x V x 4 bytes, which any loss produces). What is
left is the loss's own working memory. ``naive`` is the same divergence through a full log_softmax with
plain autograd, for comparison.

    python benchmarks/bench_kd_memory.py [--vocab 49152]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from kdcache.train.divergences import DIVERGENCES, bucket_log_probs

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

n, vocab, chunk, mode, name = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
g = torch.Generator().manual_seed(0)
z = torch.randn(n, vocab, generator=g).requires_grad_(True)
t = torch.log_softmax(torch.randn(n, vocab, generator=g), -1)
vals, ids = t.topk(64, -1)
tail = torch.log(-torch.expm1(torch.logsumexp(vals, -1)))
del t
div = DIVERGENCES[name].fn
p = DIVERGENCES[name].config() if DIVERGENCES[name].config else None  # its default parameters (losses.<name>)
before = status("VmRSS")
# reset the high-water mark so the peak below is the loss's
open("/proc/self/clear_refs", "w").write("5")
if mode == "chunked":
    tb, sb = bucket_log_probs(z, ids, vals, tail, 1.0, "bucket", chunk_rows=chunk)
else:
    s = torch.log_softmax(z, -1)
    s_k = s.gather(1, ids)
    s_tail = torch.logsumexp(s.scatter(-1, ids, float("-inf")), -1)
    tb = torch.log_softmax(torch.cat([vals, tail[:, None]], -1), -1)
    sb = torch.cat([s_k, s_tail[:, None]], -1)
div(tb, sb, p).sum().backward()
peak = status("VmHWM")
grad = n * vocab * 4
print(json.dumps({"tokens": n, "chunk": chunk, "mode": mode, "loss_mib": round((peak - before - grad) / 2**20, 1),
                  "logits_mib": round(n * vocab * 4 / 2**20, 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--tokens", default="1024,4096,8192")
    ap.add_argument("--chunks", default="16,64,256")
    ap.add_argument("--divergence", default="jsd")
    args = ap.parse_args()
    rows = []
    for n in [int(x) for x in args.tokens.split(",")]:
        configs = [(c, "chunked") for c in [int(x) for x in args.chunks.split(",")]] + [(0, "naive")]
        for chunk, mode in configs:
            r = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.vocab), str(chunk), mode, args.divergence],
                               capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n| tokens | logits [N, V] fp32 | {' | '.join(f'chunk {c}' for c in args.chunks.split(','))} | naive autograd |")
    print("|---:|---:|" + "---:|" * (len(args.chunks.split(",")) + 1))
    for n in sorted({r["tokens"] for r in rows}):
        rs = [r for r in rows if r["tokens"] == n]
        cells = [f"{r['loss_mib']:.1f} MiB" for r in rs]
        print(f"| {n} | {rs[0]['logits_mib']:.0f} MiB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
