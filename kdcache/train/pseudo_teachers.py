"""Pseudo-teachers built from the student itself: teacher-free self-distillation and consistency training.

A pseudo-teacher produces, at training time, the same kind of targets a cache holds (top-k
log-probabilities plus the tail mass, at the positions that count), so every divergence loss works
with it unchanged and the cache only has to hold tokens. Two are built in:

- ``ema``: an exponential moving average of the student's weights (mean teacher / self-distillation);
  its predictions are smoother than the student's and improve as it does. Its weights go into every
  checkpoint, so a resumed run continues bitwise.
- ``augment``: the student's own predictions on the clean tokens teach the student reading a corrupted
  copy (each input token replaced by a random one with probability ``augment_prob``): augmentation
  consistency. The corruption is drawn from (seed, step), so a resumed run draws the same.

Add one by subclassing :class:`PseudoTeacher` and registering it in ``PSEUDO_TEACHERS``.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Callable

import torch

from kdcache.errors import ConfigError
from kdcache.modeling import selected_features
from kdcache.train.data import Batch
from kdcache.train.losses import Targets


def topk_targets(logits: torch.Tensor, labels: torch.Tensor, k: int) -> Targets:
    """Cache-shaped targets from full teacher logits [N, V]: top-k log-probabilities and the tail mass."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    if ids.shape[-1] < logp.shape[-1]:
        tail = torch.log((-torch.expm1(torch.logsumexp(values, dim=-1))).clamp_min(1e-10))
    else:
        tail = torch.full_like(values[:, 0], float("-inf"))
    return Targets(labels, ids, values, tail)


@torch.no_grad()
def _logits(model: Any, batch: Batch, autocast) -> torch.Tensor:
    with autocast():
        feats, head, _ = selected_features(model, batch.input_ids, batch.attention_mask, batch.select)
        return (head(feats) if head is not None else feats).float()


class PseudoTeacher:
    def __init__(self, cfg: Any, model: Any):
        self.cfg = cfg

    def student_batch(self, batch: Batch, step: int) -> Batch:
        """What the student reads this step (the batch itself unless the teacher corrupts it)."""
        return batch

    def targets(self, model: Any, batch: Batch, autocast) -> Targets:
        raise NotImplementedError

    def after_step(self, model: Any) -> None:
        """Called after each optimizer step."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


class EMATeacher(PseudoTeacher):
    def __init__(self, cfg: Any, model: Any):
        super().__init__(cfg, model)
        self.decay = cfg.ema_decay
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def targets(self, model: Any, batch: Batch, autocast) -> Targets:
        return topk_targets(_logits(self.ema, batch, autocast), batch.targets.labels, self.cfg.pseudo_top_k)

    @torch.no_grad()
    def after_step(self, model: Any) -> None:
        for e, p in zip(self.ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        # Tied weights appear once in parameters(); clone so safetensors sees no shared storage.
        return {f"ema.{i}": p.detach().cpu().clone() for i, p in enumerate(self.ema.parameters())}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.ema.parameters()):
                p.copy_(tensors[f"ema.{i}"].to(p.device))


class AugmentTeacher(PseudoTeacher):
    def student_batch(self, batch: Batch, step: int) -> Batch:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        ids = batch.input_ids.cpu()
        swap = (torch.rand(ids.shape, generator=g) < self.cfg.augment_prob) & batch.attention_mask.cpu().bool()
        swap[:, 0] = False  # keep the first token: every position still has context to start from
        noise = torch.randint(0, self.vocab_size, ids.shape, generator=g)
        corrupted = torch.where(swap, noise, ids).to(batch.input_ids.device)
        return replace(batch, input_ids=corrupted)

    def __init__(self, cfg: Any, model: Any):
        super().__init__(cfg, model)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]

    def targets(self, model: Any, batch: Batch, autocast) -> Targets:
        was_training = model.training
        model.eval()
        try:
            return topk_targets(_logits(model, batch, autocast), batch.targets.labels, self.cfg.pseudo_top_k)
        finally:
            model.train(was_training)


PSEUDO_TEACHERS: dict[str, Callable[[Any, Any], PseudoTeacher]] = {"ema": EMATeacher, "augment": AugmentTeacher}


def build_pseudo_teacher(cfg: Any, model: Any) -> PseudoTeacher | None:
    if cfg.pseudo_teacher == "none":
        return None
    if cfg.pseudo_teacher not in PSEUDO_TEACHERS:
        raise ConfigError(f"unknown pseudo_teacher {cfg.pseudo_teacher!r}; valid: none, {', '.join(sorted(PSEUDO_TEACHERS))}")
    return PSEUDO_TEACHERS[cfg.pseudo_teacher](cfg, model)
