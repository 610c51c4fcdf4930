"""The train stage: distil a student from a cache, never loading the teacher.

Reads top to bottom: set up (cache, student, loss, optimizer, data, resume), then one loop that
steps, logs, evaluates and checkpoints. Components live in their own modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import kdcache
from kdcache.cache import Cache, holdout_fraction_filter, open_cache, require_same_tokenizer
from kdcache.config import from_dict, to_dict, upgraded
from kdcache.errors import ConfigError, DataError, Interrupted, KDCacheError
from kdcache.fingerprint import json_hash
from kdcache.modeling import autocast_for
from kdcache.train.checkpoint import (
    checkpoint_step, latest_checkpoint, load_checkpoint, save_checkpoint,
)
from kdcache.train.config import TrainConfig
from kdcache.train.curriculum import Curriculum, competence, training_difficulties
from kdcache.train.distributed import RANK_RNG, DataParallel, World, device_for, launched_world_size, refuse_unsupported, \
    resume_position, start, stop
from kdcache.train.data import TEMPERED_TAIL, batches, collate, heldout_batches, tempered_tail_index, topk_decoder, train_columns
from kdcache.train.evaluate import evaluate
from kdcache.train.optim import build_optimizer, lr_lambda
from kdcache.train.prefetch import Prefetcher
import kdcache.train.packing as packing
from kdcache.train.losses import TOPK_SIGNALS, LossSettings, get_loss, loss_options
from kdcache.train.objective import build_objectives, forward, stage_at
from kdcache.train.reporting import Reporters
from kdcache.train.sharded import full_model_state, full_optimizer_state, load_full_model_state, load_full_optimizer_state, \
    shard_student
from kdcache.train.run_dir import prepare_run_dir, transformers_bars, write_final
from kdcache.train.pseudo_teachers import build_pseudo_teacher, pseudo_teacher_options
from kdcache.train.student import build_student

log = logging.getLogger(__name__)

_PROJ = "projections."  # checkpoint keys of the terms' projections (kept in the run, never in the exported student)


def alpha_at(cfg: TrainConfig, step: int) -> float:
    """KD weight at ``step``: constant, or moving from ``alpha`` to ``alpha_end`` (linear or cosine).

    A schedule lets the hard labels dominate early and the teacher late, or the reverse."""
    if cfg.loss in ("ce", "none"):
        return 0.0
    if cfg.alpha_schedule == "constant" or cfg.alpha_end is None:
        return cfg.alpha
    progress = min(step / max(cfg.steps - 1, 1), 1.0)
    if cfg.alpha_schedule == "cosine":
        progress = 0.5 * (1 - math.cos(math.pi * progress))
    return cfg.alpha + (cfg.alpha_end - cfg.alpha) * progress


def comparable_config(data: dict) -> dict:
    """A run's config as the resume check compares it, the saved one and the new one alike: the flat keys of
    earlier versions moved into their sections (quietly: the run's own file), every field at its value or default,
    and of ``losses`` and ``pseudo_teachers`` only the sections the run uses, in full (a section that is given
    with a loss's defaults, or not at all, is the same run; the section of a loss it does not use changes
    nothing). A config that no longer parses is compared as written."""
    try:
        parsed = from_dict(TrainConfig, upgraded(TrainConfig, data, warn=False))
        out = to_dict(parsed)
        out["losses"] = {name: to_dict(opts) for name, opts in loss_options(parsed).items()}
        pseudo = pseudo_teacher_options(parsed)
        out["pseudo_teachers"] = {parsed.pseudo_teacher: to_dict(pseudo)} if pseudo is not None else {}
        return out
    except KDCacheError:
        return data


@dataclasses.dataclass
class _Position:
    """Where a run is, for the message an interrupt prints."""

    step: int | None = None  # optimizer steps done; None until the run has started (or resumed)
    writing_final: bool = False


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Distil a student from ``cfg.cache`` into ``cfg.out``; returns the final evaluation metrics.

    Ctrl-C (KeyboardInterrupt) becomes :class:`Interrupted`, whose message says what is kept on disk."""
    cfg.validate()
    where = _Position()
    world_size = launched_world_size()  # torchrun's processes; 1 without it
    refuse_unsupported(cfg, world_size)
    world = start(cfg, world_size)
    try:
        with transformers_bars(progress and world.main):
            return _train(cfg, progress and world.main, where, world)
    except KeyboardInterrupt:
        raise Interrupted(_interrupt_message(cfg, where)) from None
    finally:
        stop(world)


def _interrupt_message(cfg: TrainConfig, where: _Position) -> str:
    """What an interrupted run keeps, read from the disk (the `latest` pointer), not from memory."""
    ckpts = Path(cfg.out) / "checkpoints"
    try:
        last = latest_checkpoint(Path(cfg.out))
    except (KDCacheError, OSError):
        last = None
    if where.step is None:
        stopped = "stopped before training started"
    elif where.writing_final:
        stopped = f"stopped after the last step ({where.step}) while writing {Path(cfg.out) / 'final'}"
    else:
        stopped = f"stopped at step {where.step} of {cfg.steps}"
    if last is not None:
        return f"{stopped}; the last checkpoint is step {checkpoint_step(last)} in {ckpts} (rerun the same command to resume from it)"
    every = f"every {cfg.save_every} steps" if cfg.save_every else "only at the end"
    return f"{stopped} before the first checkpoint ({every}: --set save_every=N); rerun to start over"


def _train(cfg: TrainConfig, progress: bool, where: _Position, world: World) -> dict[str, Any]:
    # each loss's and pseudo-teacher's own section (losses.<name>, pseudo_teachers.<name>), checked by its registry
    options = loss_options(cfg)
    pseudo_teacher_options(cfg)
    if cfg.packing:
        packing.refuse_unsupported(cfg)
    # the losses treat the top-k as a set (no sort on read) and get fp16 values widened on the device (Batch.to)
    cache = open_cache(cfg.cache, topk_order="any", keep_float16=True)
    if cache.manifest.status != "complete":
        log.warning("cache %s is still being written (%d rows so far); training on what is committed", cfg.cache, cache.manifest.num_rows)
    loss_spec = get_loss(cfg.loss) if cfg.loss != "none" else None
    if cfg.pseudo_teacher != "none" and (loss_spec is None or loss_spec.needs != TOPK_SIGNALS or cfg.stages):
        raise ConfigError(f"pseudo_teacher {cfg.pseudo_teacher} produces top-k targets; pair it with a divergence loss "
                          f"(kd, fkl, rkl, jsd, skl, srkl, tv) and no stages, not loss {cfg.loss!r}" + (" with stages" if cfg.stages else ""))
    for name in {cfg.loss, *(st.loss for st in cfg.stages if st.loss)} - {"none"}:
        needs = () if cfg.pseudo_teacher != "none" else get_loss(name).needs  # the pseudo-teacher supplies the top-k
        missing = [c for c in needs if c not in cache.columns]
        if missing:
            flag = "--sampled-tokens N" if missing[0].startswith("sampled_") else "--top-k K"
            raise ConfigError(f"loss {name!r} needs the cache signal {missing[0]}, which {cfg.cache} lacks; regenerate it with `kdcache generate {flag}`")
    eval_source = _open_eval_cache(cfg, cache)
    tail_index = _tail_mode(cfg, cache)
    device = device_for(cfg, world.local_rank)
    autocast = autocast_for(cfg.precision, device)
    model, tokenizer = build_student(cfg.student, cache, seed=cfg.seed)
    objectives, projections = build_objectives(cfg, model, cache)  # every term's bad input is refused here, before the run dir
    if cfg.packing:  # a student that cannot keep packed examples apart too; before the pseudo-teacher, whose EMA copy keeps the hook
        packing.enable(model)
    out, ckpt = world.on_main(lambda: prepare_run_dir(cfg, comparable_config))  # same config resumes, a different one is refused
    model.to(device).train()
    sharded = world.active and cfg.distributed.strategy == "fsdp"
    sharded_root = shard_student(model) if sharded else None  # before the optimizer, which must hold the shards
    projections.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pseudo = build_pseudo_teacher(cfg, model)
    world.own_randoms(cfg.seed)
    for peer in (pseudo.extra_students().values() if cfg.packing and pseudo is not None else ()):
        packing.enable(peer)  # peers are students of their own
    # the projections train with the student (after its parameters, so a run without terms has the same optimizer)
    optimizer = build_optimizer(torch.nn.ModuleList([model, projections]) if len(projections) else model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    settings = LossSettings(cfg.temperature, alpha_at(cfg, 0), cfg.tail, options=options)  # every stage's loss's section

    eval_batches = _eval_batches(cfg, cache, eval_source, pad_id)
    is_heldout = holdout_fraction_filter(cfg.eval_fraction)
    reads = (*(c for obj in objectives for c in obj.needs.columns if cfg.pseudo_teacher == "none" or c not in TOPK_SIGNALS),
             *(pseudo.reads if pseudo is not None else ()),
             *((TEMPERED_TAIL,) if tail_index is not None else ()), *((cfg.curriculum.by,) if cfg.curriculum.enabled else ()))
    curriculum = (Curriculum(cfg.curriculum, training_difficulties(cache, cfg.curriculum.by, is_heldout), cfg.steps)
                  if cfg.curriculum.enabled else None)
    # a coded top-k travels as its codes and is decoded on the device (Batch.to) when cfg.topk_decode says so
    on_device = cfg.topk_decode == "device" or (cfg.topk_decode == "auto" and device.type == "cuda")
    stream = cache.stream(shuffle=True, seed=cfg.seed, window=cfg.shuffle_window, epochs=None,
                          columns=train_columns(cache, reads, topk_codes=on_device), keep=lambda i: not is_heldout(i),
                          rank=world.rank, world=world.size)
    make_batch = functools.partial(packing.pack if cfg.packing else collate, topk_decode=topk_decoder(cache) if on_device else None)

    step = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler, device, *(
            (load_full_model_state, lambda sd: load_full_optimizer_state(model, optimizer, sd)) if sharded else ()))
        extra = state["extra_tensors"]
        if len(projections):
            projections.load_state_dict({k[len(_PROJ):]: v.to(device) for k, v in extra.items() if k.startswith(_PROJ)})
        if pseudo is not None:
            pseudo.load_state_tensors({k: v for k, v in extra.items() if not k.startswith((_PROJ, RANK_RNG))})
        stream.load_state_dict(resume_position(state, world, cfg))
        if RANK_RNG + str(world.rank) in extra:  # ranks other than 0 continue their own random stream
            torch.set_rng_state(extra[RANK_RNG + str(world.rank)])
        step = state["step"]
        log.info("resumed from %s at step %d", ckpt, step)
    where.step = step
    # A curriculum skips the examples above the difficulty of the step a batch is made for, as the stream passes
    # them: batch number `data.produced` of this run (late-bound: read only once batches are being made).
    examples = curriculum.filter(stream, lambda: step0 + data.produced // cfg.grad_accum) if curriculum is not None else stream
    step0 = step
    # Made ahead in a thread, each batch with the reader's state after it (what a checkpoint saves); pinned for CUDA.
    data = Prefetcher(batches(examples, cfg.batch_size, pad_id, tail_index, make_batch),
                      stream.state_dict, cfg.prefetch, transform=(lambda b: b.pin_memory()) if device.type == "cuda" else None)
    data_state = stream.state_dict()  # the reader's position after the last batch the step consumed
    saved = ckpt  # the newest checkpoint, whose weights are the model's whenever its step is `step`
    # DDP around everything trained (the student and the terms' projections); one process: no wrapper
    parallel = DataParallel(world, torch.nn.ModuleList([model, projections]), find_unused=bool(cfg.stages), sharded_root=sharded_root)

    def checkpoint(at: int) -> None:
        nonlocal saved
        positions, rngs = world.gather(data_state), world.gather(torch.get_rng_state())  # every rank's; rank 0 writes
        full = (full_model_state(model), full_optimizer_state(model, optimizer)) if sharded else None  # gathered by every rank
        saved = world.on_main(lambda: save_checkpoint(
            out, at, model, tokenizer, optimizer, scheduler,
            {"data": positions[0], **({"data_ranks": positions} if world.active else {}), "world_size": world.size,
             "config_hash": json_hash(to_dict(cfg)), "kdcache_version": kdcache.__version__},
            cfg.keep_checkpoints, extra_tensors={**(pseudo.state_tensors() if pseudo is not None else {}),
                                                 **{_PROJ + k: v for k, v in projections.state_dict().items()},
                                                 **{f"{RANK_RNG}{r}": t for r, t in enumerate(rngs) if r}}, full_state=full))

    # metrics.jsonl (cut back to the resumed step) and any --report-to reporters: written by rank 0 only
    with data, (Reporters(out, cfg.report_to, start_step=step) if world.main else contextlib.nullcontext()) as report, \
            tqdm(total=cfg.steps, initial=step, unit="step", desc=f"train[{cfg.loss}]", disable=not progress) as bar:
        sums: dict[str, Any] = {}
        tokens_since = 0
        t0 = time.perf_counter()
        final: dict[str, Any] = {}
        while step < cfg.steps:
            try:
                micro = []
                for _ in range(cfg.grad_accum):
                    batch, data_state = next(data)
                    micro.append(batch.to(device))
            except StopIteration:
                raise DataError(
                    f"no training examples in {cfg.cache}: all {cache.manifest.num_rows} rows are held out for evaluation; "
                    "lower --set eval_fraction=... or generate more rows"
                ) from None
            total_tokens = world.total(sum(b.num_tokens for b in micro))  # the step's target tokens over every rank
            stage = stage_at(objectives, step)
            settings.alpha = stage.alpha if stage.alpha is not None else alpha_at(cfg, step)
            for i, b in enumerate(micro):
                if pseudo is not None:  # targets from the student itself, computed before it reads the batch
                    b = dataclasses.replace(pseudo.student_batch(b, step), targets=pseudo.targets(model, b, autocast))
                loss_sum, parts = parallel.run(lambda: forward(model, b, stage, settings, autocast), last=i == len(micro) - 1)
                (loss_sum / (max(total_tokens, 1) / world.size)).backward()  # DDP averages over ranks: the global sum
                for key, value in {**parts, "loss": loss_sum.detach(), "teacher_nll": b.teacher_nll_sum}.items():
                    sums[key] = sums.get(key, 0.0) + value  # tensors: no device sync until we log
            for p in stage.frozen:  # AdamW skips a parameter without a gradient: no update, no decay, no moments
                p.grad = None
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if pseudo is not None:
                pseudo.after_step(model)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            where.step = step
            tokens_since += total_tokens
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - t0
                row = {"step": step, "lr": scheduler.get_last_lr()[0], "alpha": settings.alpha, "tokens_per_s": tokens_since / elapsed}
                if cfg.stages:
                    row["stage"] = objectives.index(stage)
                if curriculum is not None:
                    row["curriculum_competence"] = competence(cfg.curriculum, step - 1, cfg.steps)  # of the step just trained
                row.update({k: v / max(tokens_since, 1) for k, v in world.sum_values(sums).items()})
                if world.main:
                    report.write(row, "train")
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                sums, tokens_since, t0 = {}, 0, time.perf_counter()
            if eval_batches and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                evaluated = lambda: {"step": step, **evaluate(model, eval_batches, device, autocast)}  # noqa: E731
                final = parallel.run(evaluated, last=True) if sharded else world.on_main(evaluated)  # sharded: every rank
                if world.main:
                    report.write(final, "eval")
                    log.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in final.items() if k != "step"))
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                checkpoint(step)

    where.writing_final = True
    return world.on_main(lambda: _finish(out, saved, step, model, tokenizer, pseudo, objectives, eval_batches, device, autocast, final))


def _finish(out, saved, step, model, tokenizer, pseudo, objectives, eval_batches, device, autocast, final) -> dict[str, Any]:
    """``final/`` and ``final_metrics.json`` (rank 0 only under torchrun)."""
    extras = {f"peers/{n}": m for n, m in (pseudo.extra_students() if pseudo is not None else {}).items()}
    extras.update({f"exits/{n}": m for obj in objectives for _, _, term in obj.terms for n, m in term.exports(model).items()})
    write_final(out, saved, step, model, tokenizer, extras)
    if not final and eval_batches:
        final = {"step": step, **evaluate(model, eval_batches, device, autocast)}
    for name, m in extras.items() if eval_batches else ():
        group, member = name.split("/")
        final.setdefault(group, {})[member] = evaluate(m, eval_batches, device, autocast)
    (out / "final_metrics.json").write_text(json.dumps(final, indent=2))
    return final


def _tail_mode(cfg: TrainConfig, cache: Cache) -> int | None:
    """Index of the stored exact tempered tail the run reads, or None (T = 1, renormalised top-k, pseudo-teacher
    targets, which carry their own exact tail, or the bucket-tempered approximation). Logged either way."""
    if cfg.temperature == 1.0 or cfg.tail == "renormalize" or cfg.pseudo_teacher != "none" or cfg.loss == "none" or get_loss(cfg.loss).needs != TOPK_SIGNALS:
        return None
    index = tempered_tail_index(cache, cfg.temperature) if cfg.tempered_tail != "bucket" else None
    stored = cache.manifest.tail_temperatures
    if index is None and cfg.tempered_tail == "exact":
        raise ConfigError(f"tempered_tail exact: {cfg.cache} stores the exact tail mass for T in {stored or 'none'}, not T={cfg.temperature}; "
                          f"regenerate with `kdcache generate --tail-temperatures {cfg.temperature:g}` (transformers backend) "
                          "or use --set tempered_tail=bucket")
    log.info("temperature %g, tail bucket: %s", cfg.temperature,
             "exact (the cache's stored tail mass at this T)" if index is not None else
             f"bucket-tempered approximation (the cache stores exact tails for T in {stored or 'none'})")
    return index


def _open_eval_cache(cfg: TrainConfig, cache: Cache) -> Cache | None:
    if not cfg.eval_cache:
        return None
    source = open_cache(cfg.eval_cache, topk_order="any", keep_float16=True)
    require_same_tokenizer(cache.manifest, source.manifest, cfg.cache, cfg.eval_cache, "evaluating on another cache")
    return source


def _eval_batches(cfg: TrainConfig, cache: Cache, source: Cache | None, pad_id: int) -> list:
    if source is None:
        return heldout_batches(cache, cfg.eval_fraction, cfg.eval_max_examples, cfg.batch_size, pad_id) if cfg.eval_fraction > 0 else []
    batches = heldout_batches(source, cfg.eval_fraction, cfg.eval_max_examples, cfg.batch_size, pad_id)
    if not batches:
        raise DataError(f"eval cache {cfg.eval_cache} has no held-out rows at eval_fraction={cfg.eval_fraction}; "
                        "raise --set eval_fraction=... or pass eval_fraction=0 to evaluate every row")
    return batches
