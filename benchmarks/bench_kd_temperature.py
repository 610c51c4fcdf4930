"""Cost of the KD loss alone (forward + backward over [tokens, vocab] logits) at T = 1 and T = 2, in both
tail modes, next to cross-entropy, interleaved in one run (machines are noisy: read the ratios).

    python benchmarks/bench_kd_temperature.py [--tokens 1016] [--vocab 49152] [--k 64] [--repeats 7]

T = 2 with the exact stored tail needs the student's softmax at T and at 1 (for the hard-label term): two
passes over the vocabulary, as T != 1 always did. The bucket-tempered mode takes the student's softmax at 1,
so the hard-label term shares its pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from common import machine
from kdcache.train.losses import LossSettings, Targets, cross_entropy_loss, sparse_kd_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1016)
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    N, V, k = args.tokens, args.vocab, args.k
    z0 = torch.randn(N, V) * 2
    lp = torch.log_softmax(torch.randn(N, V) * 3, -1)
    vals, ids = lp.topk(k, -1)
    tail = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1)
    exact = Targets(torch.randint(0, V, (N,)), ids, vals, tail, tail_logprob_t=tail / 2)  # any value in (0, 1) for timing
    bucket = dataclasses.replace(exact, tail_logprob_t=None)
    cases = {
        "ce": (cross_entropy_loss, exact, LossSettings(alpha=0.0)),
        "kd_T1_alpha0.5": (sparse_kd_loss, exact, LossSettings(1.0, 0.5)),
        "kd_T2_alpha0.5_exact_tail": (sparse_kd_loss, exact, LossSettings(2.0, 0.5)),
        "kd_T2_alpha0.5_bucket_tempered": (sparse_kd_loss, bucket, LossSettings(2.0, 0.5)),
        "kd_T2_alpha1_exact_tail": (sparse_kd_loss, exact, LossSettings(2.0, 1.0)),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.repeats + 1):
        for name, (fn, targets, settings) in cases.items():
            z = z0.clone().requires_grad_()
            t0 = time.perf_counter()
            loss, _ = fn(z, targets, settings)
            loss.backward()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    ce = statistics.median(times["ce"])
    print(json.dumps({
        "machine": machine(), "threads": torch.get_num_threads(), "shape": f"{N} x {V}, k={k}",
        "median_s": {n: round(statistics.median(t), 4) for n, t in times.items()},
        "ratio_to_ce": {n: round(statistics.median(t) / ce, 2) for n, t in times.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
