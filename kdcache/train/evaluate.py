"""Held-out evaluation: perplexity, KD loss against the cached teacher, top-1 agreement, teacher perplexity."""

from __future__ import annotations

import math
from typing import Any

import torch

from kdcache.cache import open_cache
from kdcache.config import show
from kdcache.errors import ConfigError
from kdcache.locations import check_model_folder
from kdcache.modeling import autocast_for, resolve_device, selected_features
from kdcache.train.config import StudentConfig
from kdcache.train.data import Batch, heldout_batches
from kdcache.train.losses import LossSettings, sparse_kd_loss
from kdcache.train.student import build_student

_EVAL_CHUNK = 2048  # target rows per logits chunk: bounds eval memory


@torch.no_grad()
def evaluate(model: Any, batches: list[Batch], device: torch.device, autocast: Any) -> dict[str, float]:
    was_training = model.training
    model.eval()
    ce = kd = agree = nll = 0.0
    n = 0
    has_teacher = bool(batches) and batches[0].targets.topk_ids is not None
    # The same yardstick for every run: forward KL at T=1 over the top-k + tail buckets, whatever the training loss.
    kd_settings = LossSettings(temperature=1.0, alpha=1.0, tail="bucket")
    for batch in batches:
        b = batch.to(device)
        with autocast():
            feats, head, _ = selected_features(model, b.input_ids, b.attention_mask, b.select)
        for s in range(0, feats.shape[0], _EVAL_CHUNK):
            logits = (head(feats[s : s + _EVAL_CHUNK]) if head is not None else feats[s : s + _EVAL_CHUNK]).float()
            labels = b.targets.labels[s : s + _EVAL_CHUNK]
            ce += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            if has_teacher:
                t = b.targets
                part = type(t)(labels, t.topk_ids[s : s + _EVAL_CHUNK], t.topk_logprobs[s : s + _EVAL_CHUNK], t.tail_logprob[s : s + _EVAL_CHUNK])
                kd += sparse_kd_loss(logits, part, kd_settings)[1]["kd"].item()
                top1 = part.topk_ids.gather(1, part.topk_logprobs.argmax(1, keepdim=True))[:, 0]  # (any top-k order)
                agree += (logits.argmax(-1) == top1).sum().item()
        n += batch.num_tokens
        nll += batch.teacher_nll_sum
    if was_training:
        model.train()
    if n == 0:
        return {}
    out = {"eval_tokens": n, "eval_ce": ce / n, "eval_ppl": math.exp(min(ce / n, 50.0))}
    if has_teacher:
        out.update({"eval_kd": kd / n, "eval_top1_agreement": agree / n, "teacher_ppl": math.exp(min(nll / n, 50.0))})
    return out


def evaluate_student(
    cache_path: str,
    student: str,
    *,
    eval_fraction: float = 0.05,
    max_examples: int = 256,
    batch_size: int = 8,
    device: str = "auto",
    allow_pickle_weights: bool = False,
) -> dict[str, float]:
    """``kdcache eval``: a saved student on a cache's held-out split (``eval_fraction=0`` means every row).
    The student loads from safetensors only (and without remote code) unless ``allow_pickle_weights``."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"--eval-fraction must be in [0, 1), got {show(eval_fraction)}; 0 evaluates every row")
    if max_examples < 1 or batch_size < 1:
        raise ConfigError(f"--max-examples and --batch-size must be positive, got {max_examples} and {batch_size}")
    check_model_folder(student, "student", "--student")
    cache = open_cache(cache_path, topk_order="any")
    dev = resolve_device(device)
    model, tokenizer = build_student(StudentConfig(path=student, allow_pickle_weights=allow_pickle_weights), cache)
    model.to(dev)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return evaluate(model, heldout_batches(cache, eval_fraction, max_examples, batch_size, pad), dev, autocast_for("auto", dev))
