"""Cost of a KD step versus a CE step for the same student and batch (forward + backward + AdamW).
The generic divergence losses (--divergences) are timed beside them.

The demo student (Llama, hidden 128, 4 layers, vocab 49,152) on 8 x 128-token batches with a k=64
cache. Steps are interleaved (CE, KD, CE, KD, ...) so machine noise hits both alike; medians reported.
A naive autograd implementation of the same KD loss is timed too, to show what the hand-written
gradient buys.

    python benchmarks/bench_train_step.py [--steps 20] [--batch 8] [--length 128]
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import torch

from common import demo_student, machine, step_arguments, synthetic_topk
from kdcache.train.config import TrainConfig
from kdcache.train.data import Batch
from kdcache.train.objective import Objective, forward
from kdcache.train.optim import build_optimizer
from kdcache.train.losses import LossSettings, LossSpec, Targets, cross_entropy_loss, get_loss, sparse_kd_loss, teacher_buckets


def naive_kd(logits, targets: Targets, settings: LossSettings):
    """The same bucket KD (bucket-tempered at T != 1) written with plain autograd (for comparison only)."""
    q, q_tail = teacher_buckets(targets.topk_logprobs, targets.tail_logprob, settings.temperature, settings.tail)
    s = torch.log_softmax(logits.float(), dim=-1)
    s_k = s.gather(1, targets.topk_ids)
    log_r = torch.log((-torch.expm1(torch.logsumexp(s_k, -1))).clamp_min(1e-7))
    b = torch.log_softmax(torch.cat([s_k, log_r[:, None]], -1) / settings.temperature, -1)
    s_k, log_r = b[:, :-1], b[:, -1]
    kd = (q * (q.clamp_min(1e-38).log() - s_k)).sum() + (q_tail * (q_tail.clamp_min(1e-38).log() - log_r)).sum()
    ce = torch.nn.functional.cross_entropy(logits.float(), targets.labels, reduction="sum")
    total = settings.alpha * settings.temperature**2 * kd + (1 - settings.alpha) * ce
    return total, {}


def bucket_tempered(logits, targets: Targets, settings: LossSettings):
    """kd at T != 1 on a cache without the stored tail (the bucket-tempered mode)."""
    return sparse_kd_loss(logits, dataclasses.replace(targets, tail_logprob_t=None), settings)


def make_batch(batch: int, length: int, k: int, vocab: int = 49_152) -> Batch:
    ids_pool, lp_pool, tail_pool = synthetic_topk(batch * (length - 1), k=k)
    ids = torch.randint(0, vocab, (batch, length))
    select = torch.ones(batch, length - 1, dtype=torch.bool)
    tail = torch.from_numpy(tail_pool)
    # a stand-in for the stored exact tail at T = 2 (timing only: any value in (0, 1) exercises the same code)
    targets = Targets(ids[:, 1:][select], torch.from_numpy(ids_pool).long(), torch.from_numpy(lp_pool), tail, tail_logprob_t=tail / 2)
    return Batch(ids, torch.ones_like(ids), select, targets, int(select.sum()), 0.0)


def main() -> None:
    ap = step_arguments(__doc__)
    ap.add_argument("--divergences", default="fkl,rkl,jsd", help="generic divergence losses to time too (comma-separated)")
    args = ap.parse_args()
    model, s = demo_student()
    opt = build_optimizer(model, TrainConfig(cache="x", out="x"))
    batch = make_batch(args.batch, args.length, args.k)
    variants = {
        "ce": (cross_entropy_loss, LossSettings(alpha=0.0)),
        "kd_T1_alpha0.5": (sparse_kd_loss, LossSettings(temperature=1.0, alpha=0.5)),
        "kd_T2_alpha0.5_exact_tail": (sparse_kd_loss, LossSettings(temperature=2.0, alpha=0.5)),
        "kd_T2_alpha0.5_bucket_tempered": (bucket_tempered, LossSettings(temperature=2.0, alpha=0.5)),
        "kd_T1_alpha1": (sparse_kd_loss, LossSettings(temperature=1.0, alpha=1.0)),
        "naive_autograd_kd_T1_alpha0.5": (naive_kd, LossSettings(temperature=1.0, alpha=0.5)),
        **{f"{d}_T1_alpha0.5": (get_loss(d).fn, LossSettings(temperature=1.0, alpha=0.5)) for d in args.divergences.split(",") if d},
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    nullctx = __import__("contextlib").nullcontext
    for step in range(args.steps + 2):
        for name, (fn, settings) in variants.items():
            t0 = time.perf_counter()
            loss, _ = forward(model, batch, Objective(name, LossSpec(fn, (), name), None, [], [], 0, 1), settings, nullctx)
            (loss / batch.num_tokens).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 2:  # warm-up
                times[name].append(time.perf_counter() - t0)
    ce = statistics.median(times["ce"])
    result = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "batch": f"{args.batch}x{args.length} tokens, k={args.k}, vocab 49152, student hidden {s.hidden_size} x {s.num_layers} layers",
        "median_step_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "ratio_to_ce": {k: round(statistics.median(v) / ce, 3) for k, v in times.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
