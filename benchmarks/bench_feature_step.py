"""Cost of a step with loss terms (feature KD on 3 layers, MiniLMv2 attention relations, layer-wise exits)
versus a logit-KD step, and of reading hidden states from a cache versus the same batches in memory.

The demo student (Llama, hidden 128, 4 blocks, vocab 49,152) on 8 x 128-token batches with a k=64 top-k;
teacher signals shaped like SmolLM2-135M's (hidden 576; q/k/v 576 + 192 + 192). Variants are interleaved
step by step so machine noise hits all alike; medians reported, with the ratio to the logit-KD step.

With ``--cache DIR`` (a cache with hidden layers, e.g. the recipe runner's feature cache) the trainer's own
data path (shuffled stream, held-out filter, collate) feeds the feature-KD step, interleaved with the same
step on batches collated beforehand and kept in memory.

    python benchmarks/bench_feature_step.py [--steps 20] [--cache runs/recipes/cache-features]
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from types import SimpleNamespace

import torch

from common import demo_student, machine, step_arguments, synthetic_topk
from kdcache.train.config import TrainConfig
from kdcache.train.data import Batch
from kdcache.train.losses import LossSettings, Targets, get_loss
from kdcache.train.objective import TERMS, Objective, forward
from kdcache.train.optim import build_optimizer
from kdcache.train.terms import TermContext, term_config

TEACHER_LAYERS, TEACHER_WIDTH, QKV = [10, 20, 30], 576, [576, 192, 192]


def make_batch(batch: int, length: int, k: int, vocab: int = 49_152) -> Batch:
    ids_pool, lp_pool, tail_pool = synthetic_topk(batch * (length - 1), k=k)
    ids = torch.randint(0, vocab, (batch, length))
    select = torch.ones(batch, length - 1, dtype=torch.bool)
    targets = Targets(ids[:, 1:][select], torch.from_numpy(ids_pool).long(), torch.from_numpy(lp_pool), torch.from_numpy(tail_pool))
    signals = {f"hidden_{L}": torch.randn(batch, length, TEACHER_WIDTH) for L in TEACHER_LAYERS}
    signals["hidden_mask"] = torch.ones(batch, length, dtype=torch.bool)
    signals["qkv_30"] = torch.randn(batch, length, sum(QKV))
    return Batch(ids, torch.ones_like(ids), select, targets, int(select.sum()), 0.0, signals)


def fake_manifest() -> SimpleNamespace:
    return SimpleNamespace(signals={"hidden": {"layers": TEACHER_LAYERS, "size": TEACHER_WIDTH, "teacher_layers": 30},
                                    "qkv": {"layers": [30], "sizes": QKV, "teacher_layers": 30}}, settings={})


def objective(model, projections, name: str, terms: dict) -> Objective:
    built = []
    for term, section in terms.items():
        tc = term_config(term, section, f"terms.{term}")
        built.append((term, tc.weight, TERMS[term].build(tc, TermContext(model, fake_manifest(), [], projections, f"terms.{term}"))))
    return Objective(name, get_loss("kd"), None, built, [], 0, 1)


def timed_step(model, opt, batch, obj, settings) -> float:
    t0 = time.perf_counter()
    loss, _ = forward(model, batch, obj, settings, contextlib.nullcontext)
    (loss / batch.num_tokens).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = step_arguments(__doc__)
    ap.add_argument("--cache", default="", help="a cache with hidden layers: time the real data path against in-memory batches")
    args = ap.parse_args()
    model, s = demo_student()
    projections = torch.nn.ModuleDict()
    variants = {
        "kd": objective(model, projections, "kd", {}),
        "kd+hidden_3_layers": objective(model, projections, "kd+hidden", {"hidden": {"weight": 1.0, "metric": "cosine"}}),
        "kd+attention_1_block": objective(model, projections, "kd+attention", {"attention": {"weight": 1.0, "mapping": [[4, 30]]}}),
        "kd+exits_3": objective(model, projections, "kd+exits", {"exits": 1.0}),
    }
    opt = build_optimizer(torch.nn.ModuleList([model, projections]), TrainConfig(cache="x", out="x"))
    batch = make_batch(args.batch, args.length, args.k)
    settings = LossSettings(temperature=1.0, alpha=0.5)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for step in range(args.steps + 2):
        for name, obj in variants.items():
            t = timed_step(model, opt, batch, obj, settings)
            if step >= 2:  # warm-up
                times[name].append(t)
    kd = statistics.median(times["kd"])
    result = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "batch": f"{args.batch}x{args.length} tokens, k={args.k}, vocab 49152, student hidden {s.hidden_size} x {s.num_layers} blocks; "
                 f"teacher hidden {TEACHER_WIDTH} at layers {TEACHER_LAYERS}, q/k/v {QKV}",
        "median_step_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "ratio_to_kd": {k: round(statistics.median(v) / kd, 3) for k, v in times.items()},
    }
    if args.cache:
        result["data_path"] = data_path(args, model, projections)
    print(json.dumps(result, indent=2))


def data_path(args, model, projections) -> dict:
    """Feature-KD steps fed by the trainer's stream from ``args.cache`` vs the same batches already in memory."""
    from kdcache.cache import holdout_fraction_filter, open_cache
    from kdcache.train.data import batches, train_columns

    cache = open_cache(args.cache)
    projections_real = torch.nn.ModuleDict()
    terms = {"hidden": {"weight": 1.0, "metric": "cosine"}}
    tc = term_config("hidden", terms["hidden"], "terms.hidden")
    term = TERMS["hidden"].build(tc, TermContext(model, cache.manifest, cache.columns, projections_real, "terms.hidden"))
    obj = Objective("kd+hidden", get_loss("kd"), None, [("hidden", 1.0, term)], [], 0, 1)
    opt = build_optimizer(torch.nn.ModuleList([model, projections_real]), TrainConfig(cache="x", out="x"))
    is_heldout = holdout_fraction_filter(0.1)
    columns = train_columns(cache, obj.needs.columns)

    def stream():
        return batches(cache.stream(shuffle=True, seed=0, window=4, epochs=None, columns=columns, keep=lambda i: not is_heldout(i)), args.batch)

    memory = [b for _, b in zip(range(args.steps + 2), stream())]
    live = stream()
    settings = LossSettings(temperature=1.0, alpha=0.5)
    t_live, t_mem, t_reads = [], [], []
    for step in range(args.steps + 2):
        t0 = time.perf_counter()
        b = next(live)
        t_read = time.perf_counter() - t0
        t_step = timed_step(model, opt, b, obj, settings)
        t_m = timed_step(model, opt, memory[step], obj, settings)
        if step >= 2:
            t_live.append(t_read + t_step)
            t_mem.append(t_m)
            t_reads.append(t_read)
    live_s, mem_s = statistics.median(t_live), statistics.median(t_mem)
    return {"cache": args.cache, "layers": cache.manifest.signals["hidden"]["layers"], "codec": sorted({c["codec"] for c in cache.manifest.signals["hidden"]["columns"].values()}),
            "median_step_from_cache_s": round(live_s, 4), "median_step_in_memory_s": round(mem_s, 4), "ratio": round(live_s / mem_s, 3),
            # reading + collating one batch (hidden columns decoded) on the step's own thread, as a share of the step
            "median_read_s": round(statistics.median(t_reads), 4), "read_share_of_step": round(statistics.median(t_reads) / mem_s, 4)}


if __name__ == "__main__":
    main()
