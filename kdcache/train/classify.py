"""Cross-task distillation: a classifier student learns task B (a label the cache keeps) from a teacher trained
for task A (e.g. language modelling), through the teacher's example embeddings and a learned head.

The student is a sequence classifier (a Llama-style body and a linear head over the last token's final state,
as transformers' ``*ForSequenceClassification`` read a row). Its loss per row is cross-entropy on the label
plus ``teacher_weight`` times the distance between a learned linear map of that same representation and the
teacher's pooled embedding of the row (``pooled_<L>``, written by ``generate --set pooled_layers=[L]``). The
map trains with the student, is saved in the run's checkpoints and never in the exported classifier.
``teacher_weight: 0`` is the same student without the teacher, the baseline every claim is measured against.
A teacher trained for the same task (a sequence classifier, ``generate --backend transformers-encoder``) also
gives soft labels: ``kd_weight`` adds T^2 KL(teacher_T || student_T) over its ``class_logits``.

Cross-modal: with ``input: image`` the student is a small conv net on image files the cache names per row
(kdcache/train/vision.py), e.g. the text the teacher read, rendered; everything else is the same.

The run directory is like ``train``'s: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step-N`` (exact
resume: weights, optimizer, schedule, RNG and the data stream's position), ``final/`` (a transformers
``LlamaForSequenceClassification`` folder whose ``config.json`` names the labels).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from kdcache.cache import Cache, holdout_fraction_filter, open_cache
from kdcache.cache.schema import CLASS_LOGITS_COLUMN
from kdcache.config import FRACTION, NON_NEGATIVE, POSITIVE, Valid, check_fields, doc, typed_sections
from kdcache.errors import ConfigError, DataError
from kdcache.modeling import resolve_device
from kdcache.train.checkpoint import load_checkpoint, save_checkpoint
from kdcache.train.config import StudentConfig
from kdcache.train.features import feature_distance
from kdcache.train.optim import build_optimizer, lr_lambda
from kdcache.train.run_dir import prepare_run_dir, transformers_bars, truncate_metrics, write_final
from kdcache.train.student import STUDENT_ARCHS, load_tokenizer
from kdcache.train.vision import ImageConfig, build_image_classifier, check_images, load_pixels

log = logging.getLogger(__name__)
_HEAD = "head."  # checkpoint prefix of the teacher-embedding map


@dataclass
class ClassifyConfig:
    cache: str = doc("Cache directory written by `kdcache generate` with the label kept (keep_fields) and, to learn from the "
                     "teacher, its pooled embeddings (pooled_layers).", "")
    out: str = doc("Run directory: checkpoints, final classifier, metrics.", "")
    input: Literal["tokens", "image"] = doc("What the student reads: the cache's tokens (a Llama-style body, `student`) or "
                                            "image files named by a kept field (a conv net, `image`).", "tokens")
    student: StudentConfig = doc("input tokens: the classifier's body (built from this spec; its tokenizer is the cache's).", default_factory=StudentConfig)
    image: ImageConfig = doc("input image: where the images are and the conv net's shape.", default_factory=ImageConfig)
    label_field: str = doc("Cache column holding each row's class (a field kept by generate --set keep_fields=[...]).", "label")
    teacher_signal: str = doc("Cache column of the teacher's example embedding (pooled_<L>); empty: the deepest pooled layer.", "")
    teacher_weight: float = doc("Weight of the teacher-embedding term next to the label's cross-entropy (0: no teacher).", 1.0, valid=NON_NEGATIVE)
    metric: Literal["cosine", "mse", "nmse"] = doc("Distance between the mapped student representation and the teacher embedding.", "cosine")
    kd_weight: float = doc("Weight of soft-label KD on a classifier teacher's class_logits (generate --backend transformers-encoder "
                           "with a *ForSequenceClassification teacher; its classes must be the label's values): T^2 KL(teacher_T || "
                           "student_T). 0: off.", 0.0, valid=NON_NEGATIVE)
    temperature: float = doc("Temperature of kd_weight's KD.", 1.0, valid=POSITIVE)
    center_teacher: bool = doc("Subtract the training rows' mean teacher embedding first: a language model's states share a large "
                               "common direction, and without this the term mostly teaches that direction, not what tells rows apart.", True)
    steps: int = doc("Optimizer steps.", 300, valid=POSITIVE)
    batch_size: int = doc("Rows per step.", 16, valid=POSITIVE)
    lr: float = doc("Peak learning rate (AdamW).", 3e-3, valid=POSITIVE)
    min_lr_ratio: float = doc("Final learning rate as a fraction of the peak (cosine decay).", 0.1, valid=FRACTION)
    warmup_steps: int = doc("Linear warm-up steps.", 20, valid=NON_NEGATIVE)
    weight_decay: float = doc("AdamW weight decay (matrices only).", 0.1, valid=NON_NEGATIVE)
    grad_clip: float = doc("Clip the global gradient norm to this (0 disables).", 1.0, valid=NON_NEGATIVE)
    seed: int = doc("Seed for initialisation and data order.", 0)
    eval_fraction: float = doc("Rows held out for evaluation (stable split by example_id, the same as train's).", 0.2, valid=Valid(0, 1, lo_open=True, hi_open=True))
    eval_max_examples: int = doc("Cap on held-out rows evaluated (kept in memory, collated, for the whole run).", 1024, valid=POSITIVE)
    eval_every: int = doc("Evaluate every N steps (0: only at the end).", 100, valid=NON_NEGATIVE)
    log_every: int = doc("Log training metrics every N steps.", 10, valid=POSITIVE)
    save_every: int = doc("Checkpoint every N steps (0: only at the end).", 100, valid=NON_NEGATIVE)
    keep_checkpoints: int = doc("Checkpoints to keep.", 1, valid=POSITIVE)
    shuffle_window: int = doc("Row groups shuffled together.", 4, valid=POSITIVE)
    device: str = doc("auto, cpu, cuda, cuda:N.", "auto")
    resume: bool = doc("Continue from the latest checkpoint in `out` even if the config changed.", False)
    overwrite: bool = doc("Start over, deleting an earlier run in `out`.", False)

    def __post_init__(self):
        typed_sections(self)
        check_fields(self)
        if self.resume and self.overwrite:
            raise ConfigError("pass either --resume or --overwrite, not both")

    def validate(self) -> None:
        if not self.cache:
            raise ConfigError("no cache given; pass --cache DIR (written by `kdcache generate --set keep_fields=[LABEL]`)")
        if not self.out:
            raise ConfigError("no run directory given; pass --out DIR")
        if self.student.path:
            raise ConfigError("the classifier is built from the student spec (student.*); student.path is not supported yet")


def _signals(cfg: ClassifyConfig, cache: Cache) -> tuple[str, int]:
    """The label column, checked, and the teacher column (or '' without the teacher) with its width."""
    fields = cache.manifest.signals.get("fields", {}).get("columns", {})
    if cfg.label_field not in fields:
        raise ConfigError(f"cache {cfg.cache} keeps no field {cfg.label_field!r} (it keeps {sorted(fields) or 'none'}); "
                          f"regenerate with `kdcache generate --set keep_fields=[{cfg.label_field}]` or pass --set label_field=NAME")
    if cfg.teacher_weight == 0:
        return "", 0
    pooled = cache.manifest.signals.get("pooled")
    if not pooled:
        raise ConfigError(f"cache {cfg.cache} has no teacher embeddings; regenerate with `kdcache generate --set pooled_layers=[-1]` "
                          "or pass --set teacher_weight=0 to train without the teacher")
    column = cfg.teacher_signal or f"pooled_{max(pooled['layers'])}"
    if column not in pooled["columns"]:
        raise ConfigError(f"teacher_signal {column!r} is not in the cache; it has {sorted(pooled['columns'])}")
    return column, int(pooled["size"])


def class_order(cfg: ClassifyConfig, cache: Cache, labels: list[str]) -> torch.Tensor | None:
    """For kd_weight > 0: index of each student label in the teacher's class_logits; a teacher whose classes are not the
    labels (a student head that does not fit the stored signal) is refused in one line."""
    if cfg.kd_weight == 0:
        return None
    classes = cache.manifest.signals.get("classes")
    if not classes:
        raise ConfigError(f"kd_weight needs a classifier teacher's class_logits, which {cfg.cache} lacks; generate with "
                          "--backend transformers-encoder and a *ForSequenceClassification teacher, or --set kd_weight=0")
    if sorted(classes["labels"]) != labels:
        raise ConfigError(f"the teacher's classes {classes['labels']} are not the values of {cfg.label_field!r} {labels}: "
                          "the student's head does not fit the teacher's logits; keep the field the teacher was trained on, or --set kd_weight=0")
    return torch.tensor([classes["labels"].index(name) for name in labels])


def label_names(cache: Cache, column: str) -> list[str]:
    """Every class in the cache (train and held-out rows alike: the label set, not supervision), sorted."""
    values = {str(ex[column]) for ex in cache.stream(columns=[column])}
    if len(values) < 2:
        raise DataError(f"column {column!r} of {cache.path} has {len(values)} distinct value(s); a classifier needs at least 2")
    return sorted(values)


def build_classifier(cfg: ClassifyConfig, cache: Cache, labels: list[str]):
    from transformers import AutoModelForSequenceClassification

    tok_path = cfg.student.tokenizer or cache.tokenizer_dir
    if tok_path is None:
        raise ConfigError(f"cache {cache.path} stores no tokenizer; set student.tokenizer to the teacher's tokenizer folder")
    tokenizer = load_tokenizer(str(tok_path), cfg.student.trust_remote_code)
    config = STUDENT_ARCHS[cfg.student.arch](cfg.student, cache.manifest.vocab_size, tokenizer)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    config.problem_type = "single_label_classification"
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(cfg.seed)
    return AutoModelForSequenceClassification.from_config(config), tokenizer


@dataclass
class Rows:
    inputs: dict[str, torch.Tensor]  # tokens: input_ids [B, T] right-padded, attention_mask, last [B]; image: pixels
    labels: torch.Tensor  # [B]
    teacher: torch.Tensor | None  # [B, D]
    teacher_logits: torch.Tensor | None = None  # [B, C] in the student's label order

    def to(self, device) -> Rows:
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return Rows({k: v.to(device) for k, v in self.inputs.items()}, self.labels.to(device), move(self.teacher), move(self.teacher_logits))


def _token_inputs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    lens = np.array([len(ex["input_ids"]) for ex in examples])
    ids = np.full((len(examples), int(lens.max())), pad_id, dtype=np.int64)
    for i, ex in enumerate(examples):
        ids[i, : lens[i]] = ex["input_ids"]
    mask = np.arange(ids.shape[1])[None, :] < lens[:, None]
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64)), "last": torch.from_numpy(lens - 1)}


def collate(examples: list[dict], label_ids: dict[str, int], cfg: ClassifyConfig, teacher: str, pad_id: int,
            center: torch.Tensor | None = None, order: torch.Tensor | None = None) -> Rows:
    inputs = (_token_inputs(examples, pad_id) if cfg.input == "tokens"
              else {"pixels": load_pixels(cfg.image, [ex[cfg.image.field] for ex in examples])})
    t = torch.from_numpy(np.stack([ex[teacher] for ex in examples]).astype(np.float32)) if teacher else None
    if t is not None and center is not None:
        t = t - center
    z = torch.from_numpy(np.stack([ex[CLASS_LOGITS_COLUMN] for ex in examples]))[:, order] if order is not None else None
    return Rows(inputs, torch.tensor([label_ids[str(ex[cfg.label_field])] for ex in examples]), t, z)


def representation(model: Any, rows: Rows) -> torch.Tensor:
    """What the classifier's head reads [B, H]: the last token's final state, or the image's pooled features."""
    if "pixels" in rows.inputs:
        return model.representation(rows.inputs["pixels"])
    x = rows.inputs
    hidden = model.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), x["last"]]


def losses(model: Any, head: torch.nn.Module | None, rows: Rows, cfg: ClassifyConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the rows, and its parts (detached)."""
    rep = representation(model, rows)
    logits = model.score(rep).float()
    ce = torch.nn.functional.cross_entropy(logits, rows.labels)
    parts = {"ce": ce.detach(), "accuracy": (logits.argmax(-1) == rows.labels).float().mean()}
    loss = ce
    if head is not None:
        dist = feature_distance(cfg.metric, head(rep.float()), rows.teacher).mean()
        parts["teacher_distance"] = dist.detach()
        loss = loss + cfg.teacher_weight * dist
    if rows.teacher_logits is not None:
        tau = cfg.temperature
        kd = tau * tau * torch.nn.functional.kl_div((logits / tau).log_softmax(-1), (rows.teacher_logits.float() / tau).log_softmax(-1),
                                                    log_target=True, reduction="batchmean")
        parts["class_kd"] = kd.detach()
        loss = loss + cfg.kd_weight * kd
    return loss, parts


@torch.no_grad()
def evaluate(model: Any, head: torch.nn.Module | None, batches: list[Rows], cfg: ClassifyConfig, device) -> dict[str, float]:
    was = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for rows in batches:
        _, parts = losses(model, head, rows.to(device), cfg)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(rows.labels)
        n += len(rows.labels)
    model.train(was)
    return {"eval_rows": n, **{f"eval_{k}": v / n for k, v in sums.items()}}


def _teacher_mean(cache: Cache, column: str, keep) -> torch.Tensor:
    """Mean of the training rows' teacher embeddings (one pass over one column, constant memory)."""
    total, n = None, 0
    for ex in cache.stream(columns=[column], keep=keep):
        v = ex[column].astype(np.float64)
        total = v if total is None else total + v
        n += 1
    if n == 0:
        raise DataError(f"no training rows in {cache.path}: every row is held out; lower --set eval_fraction=...")
    return torch.from_numpy((total / n).astype(np.float32))


def train_classifier(cfg: ClassifyConfig, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a classifier student; returns the final held-out metrics."""
    cfg.validate()
    with transformers_bars(progress):
        return _train(cfg, progress)


def _train(cfg: ClassifyConfig, progress: bool) -> dict[str, Any]:
    cache = open_cache(cfg.cache)
    if cache.manifest.status != "complete":
        log.warning("cache %s is still being written (%d rows so far); training on what is committed", cfg.cache, cache.manifest.num_rows)
    label, (teacher, width) = cfg.label_field, _signals(cfg, cache)
    labels = label_names(cache, label)
    order = class_order(cfg, cache, labels)
    label_ids = {name: i for i, name in enumerate(labels)}
    device = resolve_device(cfg.device)
    if cfg.input == "image":
        if cfg.image.field not in cache.manifest.signals.get("fields", {}).get("columns", {}):
            raise ConfigError(f"cache {cfg.cache} keeps no image field {cfg.image.field!r}; regenerate with "
                              f"`kdcache generate --set keep_fields=[{cfg.label_field},{cfg.image.field}]` or pass --set image.field=NAME")
        check_images(cfg.image, [ex[cfg.image.field] for ex in cache.stream(columns=[cfg.image.field])])
        model, tokenizer = build_image_classifier(cfg.image, labels, cfg.seed), None
    else:
        model, tokenizer = build_classifier(cfg, cache, labels)
    head = torch.nn.Linear(model.config.hidden_size, width) if teacher else None
    out, ckpt = prepare_run_dir(cfg)
    model.to(device).train()
    params = torch.nn.ModuleList([model, head]) if head is not None else model
    params.to(device)
    optimizer = build_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    pad = getattr(model.config, "pad_token_id", 0)
    is_heldout = holdout_fraction_filter(cfg.eval_fraction)
    columns = [cfg.image.field if cfg.input == "image" else "input_ids", label, *([teacher] if teacher else []),
               *([CLASS_LOGITS_COLUMN] if order is not None else [])]
    held = list(itertools.islice(cache.stream(columns=columns, keep=is_heldout), cfg.eval_max_examples))
    center = _teacher_mean(cache, teacher, lambda i: not is_heldout(i)) if teacher and cfg.center_teacher else None
    eval_batches = [collate(held[i: i + cfg.batch_size], label_ids, cfg, teacher, pad, center, order) for i in range(0, len(held), cfg.batch_size)]
    del held
    stream = cache.stream(shuffle=True, seed=cfg.seed, window=cfg.shuffle_window, epochs=None, columns=columns, keep=lambda i: not is_heldout(i))
    step = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler, device)
        if head is not None:
            head.load_state_dict({k[len(_HEAD):]: v.to(device) for k, v in state["extra_tensors"].items() if k.startswith(_HEAD)})
        stream.load_state_dict(state["data"])
        step = state["step"]
        truncate_metrics(out / "metrics.jsonl", step)
    examples = iter(stream)
    final: dict[str, Any] = {}
    saved = ckpt
    with open(out / "metrics.jsonl", "a") as metrics, tqdm(total=cfg.steps, initial=step, unit="step", desc="classify", disable=not progress) as bar:
        sums: dict[str, float] = {}
        since, t0 = 0, time.perf_counter()
        while step < cfg.steps:
            batch = [next(examples, None) for _ in range(cfg.batch_size)]
            if batch[0] is None:
                raise DataError(f"no training rows in {cfg.cache}: every row is held out; lower --set eval_fraction=...")
            rows = collate([ex for ex in batch if ex is not None], label_ids, cfg, teacher, pad, center, order).to(device)
            loss, parts = losses(model, head, rows, cfg)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            since += 1
            bar.update(1)
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if step % cfg.log_every == 0 or step == cfg.steps:
                row = {"step": step, "lr": scheduler.get_last_lr()[0], "steps_per_s": since / (time.perf_counter() - t0),
                       **{k: v / since for k, v in sums.items()}}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                sums, since, t0 = {}, 0, time.perf_counter()
            if eval_batches and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                final = {"step": step, **evaluate(model, head, eval_batches, cfg, device)}
                metrics.write(json.dumps(final) + "\n")
                metrics.flush()
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                extra = {_HEAD + k: v for k, v in head.state_dict().items()} if head is not None else {}
                saved = save_checkpoint(out, step, model, tokenizer, optimizer, scheduler, {"data": stream.state_dict()},
                                        cfg.keep_checkpoints, extra_tensors=extra)
    if not final and eval_batches:
        final = {"step": step, **evaluate(model, head, eval_batches, cfg, device)}
    final_dir = write_final(out, saved, step, model, tokenizer)
    (out / "final_metrics.json").write_text(json.dumps(final, indent=2))
    log.info("classifier %s: %s", final_dir, ", ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float) and math.isfinite(v)))
    return final

