"""Pseudo-teachers built from the student itself: teacher-free self-distillation and consistency training.

A pseudo-teacher produces, at training time, the same kind of targets a cache holds (top-k
log-probabilities plus the tail mass, at the positions that count), so every divergence loss works
with it unchanged and the cache only has to hold tokens. Built in:

- ``ema``: an exponential moving average of the student's weights (mean teacher / self-distillation);
  its predictions are smoother than the student's and improve as it does. Its weights go into every
  checkpoint, so a resumed run continues bitwise.
- ``augment``: the student's own predictions on the clean tokens teach the student reading a corrupted
  copy (each input token replaced by a random one with probability ``pseudo_teachers.augment.prob``):
  augmentation consistency. The corruption is drawn from (seed, step), so a resumed run draws the same.
- ``dropout``: the student's predictions under another dropout mask (self-distillation with dropout).
- ``peers``: online / collaborative distillation, several students trained together from one data pass,
  each taught by the pooled prediction of the others, optionally mixed with the cached teacher
  (:class:`PeerTeacher`).

Each owns its config section, the run's ``pseudo_teachers.<name>`` (a :class:`PseudoTeacherConfig`
subclass: ``top_k`` and its own keys), parsed and range-checked only when the run uses it. Add one: a
:class:`PseudoTeacher` subclass decorated with ``@register_pseudo_teacher(name, ItsConfig, help)``; it reads
its section as ``self.options``.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from kdcache.config import FRACTION, POSITIVE, Section, Valid, at_least, check_section_names, doc, section_config
from kdcache.errors import ConfigError
from kdcache.modeling import selected_logits, tempered_tail_logprob
from kdcache.train.data import Batch
from kdcache.train.losses import TOPK_SIGNALS, LossSettings, Targets, get_loss, loss_options
from kdcache.train.optim import build_optimizer, lr_lambda  # the run's own recipe for each peer


def topk_targets(logits: torch.Tensor, labels: torch.Tensor, k: int, temperature: float = 1.0) -> Targets:
    """Cache-shaped targets from full teacher logits [N, V]: top-k log-probabilities and the tail mass, plus
    the exact tail mass at ``temperature`` when it is not 1 (the full logits are at hand, so no approximation)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    if ids.shape[-1] < logp.shape[-1]:
        tail = torch.log((-torch.expm1(torch.logsumexp(values, dim=-1))).clamp_min(1e-10))
    else:
        tail = torch.full_like(values[:, 0], float("-inf"))
    tail_t = tempered_tail_logprob(logp, ids, [temperature])[:, 0] if temperature != 1.0 else None
    return Targets(labels, ids, values, tail, tail_logprob_t=tail_t)


@torch.no_grad()
def _logits(model: Any, batch: Batch, autocast) -> torch.Tensor:
    with autocast():
        return selected_logits(model, batch.input_ids, batch.attention_mask, batch.select).float()


@dataclass
class PseudoTeacherConfig(Section):
    """Every pseudo-teacher's section has ``top_k``; subclass it for one with parameters of its own."""

    top_k: int = doc("Top-k kept from this pseudo-teacher's predictions (plus the tail mass), as in a cache.", 64, valid=POSITIVE)


@dataclass
class EMAConfig(PseudoTeacherConfig):
    decay: float = doc("Weight of the old average per step (the moving average of the student's weights).", 0.99, valid=Valid(0, 1, hi_open=True))


@dataclass
class AugmentConfig(PseudoTeacherConfig):
    prob: float = doc("Probability of replacing each input token of the student's copy with a random one.", 0.1,
                      valid=Valid(0, 1, lo_open=True, hi_open=True))


@dataclass
class PeersConfig(PseudoTeacherConfig):
    count: int = doc("Students trained together (the run's student included).", 2, valid=at_least(2))
    teacher_weight: float = doc(
        "Weight of the cached teacher in each student's target (0: peers only; >0 mixes the cache's top-k, its tail "
        "spread evenly over the other tokens, with the peers' pooled prediction).", 0.0, valid=FRACTION)


@dataclass(frozen=True)
class PseudoTeacherSpec:
    build: Callable[..., "PseudoTeacher"]
    config: type
    help: str


PSEUDO_TEACHERS: dict[str, PseudoTeacherSpec] = {}


def register_pseudo_teacher(name: str, config: type = PseudoTeacherConfig, help: str = "") -> Callable:
    def deco(cls):
        if name in PSEUDO_TEACHERS or name == "none":
            raise ValueError(f"pseudo-teacher {name!r} registered twice")
        PSEUDO_TEACHERS[name] = PseudoTeacherSpec(cls, config, help)
        cls.name = name
        return cls

    return deco


def pseudo_teacher_options(cfg: Any, name: str | None = None) -> PseudoTeacherConfig | None:
    """The parsed section of pseudo-teacher ``name`` (default: the run's; None for none). Every section in
    ``pseudo_teachers`` is checked for unknown names and keys; only the used one's values are parsed."""
    registry = {n: spec.config for n, spec in PSEUDO_TEACHERS.items()}
    check_section_names("pseudo-teacher", registry, cfg.pseudo_teachers, "pseudo_teachers", keys=True)
    name = cfg.pseudo_teacher if name is None else name
    if name == "none":
        return None
    if name not in registry:
        close = difflib.get_close_matches(str(name), list(registry), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown pseudo_teacher {name!r}; {hint}valid: none, {', '.join(sorted(registry))}")
    return section_config("pseudo-teacher", registry, name, cfg.pseudo_teachers.get(name), f"pseudo_teachers.{name}")


class PseudoTeacher:
    name = ""  # set by register_pseudo_teacher
    reads: tuple[str, ...] = ()  # cache columns this pseudo-teacher reads beyond the tokens

    def __init__(self, cfg: Any, model: Any):
        self.cfg = cfg
        self.options = pseudo_teacher_options(cfg, self.name)  # its own section, pseudo_teachers.<name>
        # the exact tempered tail goes with the targets only where the loss uses it (tail bucket, T != 1)
        self.tail_temperature = cfg.temperature if cfg.tail == "bucket" and cfg.tempered_tail != "bucket" else 1.0

    def student_batch(self, batch: Batch, step: int) -> Batch:
        """What the student reads this step (the batch itself unless the teacher corrupts it)."""
        return batch

    def targets(self, model: Any, batch: Batch, autocast) -> Targets:
        raise NotImplementedError

    def after_step(self, model: Any) -> None:
        """Called after each optimizer step."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def extra_students(self) -> dict[str, Any]:
        """Students trained beside the run's own, saved and evaluated with it at the end."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


@register_pseudo_teacher("ema", EMAConfig, "a moving average of the student's weights")
class EMATeacher(PseudoTeacher):
    def __init__(self, cfg: Any, model: Any):
        super().__init__(cfg, model)
        self.decay = self.options.decay
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def targets(self, model: Any, batch: Batch, autocast) -> Targets:
        return topk_targets(_logits(self.ema, batch, autocast), batch.targets.labels, self.options.top_k, self.tail_temperature)

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


@register_pseudo_teacher("augment", AugmentConfig, "the student on clean tokens teaches itself on corrupted ones")
class AugmentTeacher(PseudoTeacher):
    def student_batch(self, batch: Batch, step: int) -> Batch:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        ids = batch.input_ids.cpu()
        swap = (torch.rand(ids.shape, generator=g) < self.options.prob) & batch.attention_mask.cpu().bool()
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
            return topk_targets(_logits(model, batch, autocast), batch.targets.labels, self.options.top_k, self.tail_temperature)
        finally:
            model.train(was_training)


@register_pseudo_teacher("dropout", PseudoTeacherConfig, "the student's predictions under another dropout mask")
class DropoutTeacher(PseudoTeacher):
    """The student's own predictions under another dropout mask teach it (self-distillation with dropout):
    a consistency target between two random sub-networks of the same model."""

    def __init__(self, cfg: Any, model: Any):
        super().__init__(cfg, model)
        if not getattr(model.config, "attention_dropout", 0.0):
            raise ConfigError("pseudo_teacher dropout needs a student with dropout; set --set student.attention_dropout=0.1")

    def targets(self, model: Any, batch: Batch, autocast) -> Targets:
        return topk_targets(_logits(model, batch, autocast), batch.targets.labels, self.options.top_k, self.tail_temperature)  # train mode: dropout on


@register_pseudo_teacher("peers", PeersConfig, "students trained together, each taught by the others' pooled prediction")
class PeerTeacher(PseudoTeacher):
    """Online / collaborative distillation: ``count - 1`` more students of the same architecture (other
    initial weights) train beside the run's student on the same batch, so one read of the cache feeds all
    of them. Each learns from the pooled prediction (mean probability) of all the others with the run's
    loss; the run's student is saved in ``final/``, the others in ``final/peers/peerN``. Peers' weights, optimizer moments and
    schedule position travel in every checkpoint, so resuming is exact."""

    def __init__(self, cfg: Any, model: Any):
        super().__init__(cfg, model)
        if cfg.grad_accum != 1:
            raise ConfigError("pseudo_teacher peers steps each peer once per batch; use grad_accum 1")
        self.reads = TOPK_SIGNALS if self.options.teacher_weight > 0 else ()  # the cached teacher mixed in
        device = next(model.parameters()).device
        self.peers, self.optimizers, self.schedulers = [], [], []
        for i in range(1, self.options.count):
            torch.manual_seed(cfg.seed + 7919 * i)
            peer = type(model)(model.config).to(device).train()
            opt = build_optimizer(peer, cfg)
            self.peers.append(peer)
            self.optimizers.append(opt)
            self.schedulers.append(torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
        self.loss_fn = get_loss(cfg.loss).fn
        self.settings = LossSettings(cfg.temperature, cfg.alpha, cfg.tail, options=loss_options(cfg))

    def _pooled(self, logps: list[torch.Tensor], labels: torch.Tensor, cached: torch.Tensor | None) -> Targets:
        pooled = torch.logsumexp(torch.stack(logps), dim=0) - torch.log(torch.tensor(float(len(logps))))
        if cached is not None:
            w = self.options.teacher_weight
            pooled = torch.logaddexp(pooled + math.log1p(-w), cached + math.log(w)) if w < 1.0 else cached
        return topk_targets(pooled, labels, self.options.top_k, self.tail_temperature)

    def _cached_teacher(self, batch: Batch, vocab: int) -> torch.Tensor | None:
        """The cache's top-k as a full log-distribution, its tail spread evenly over the other tokens."""
        t = batch.targets
        if self.options.teacher_weight <= 0.0:
            return None
        if t.topk_ids is None:
            raise ConfigError("pseudo_teachers.peers.teacher_weight > 0 needs a cache with the top-k signal; regenerate with `kdcache generate --top-k K`")
        k = t.topk_ids.shape[1]
        rest = t.tail_logprob - math.log(max(vocab - k, 1))
        full = rest[:, None].expand(-1, vocab).clone()
        return full.scatter_(1, t.topk_ids, t.topk_logprobs.float())

    def targets(self, model: Any, batch: Batch, autocast) -> Targets:
        labels = batch.targets.labels
        main = torch.log_softmax(_logits(model, batch, autocast), dim=-1)
        peer_logits = []
        for peer in self.peers:
            with autocast():
                peer_logits.append(selected_logits(peer, batch.input_ids, batch.attention_mask, batch.select))
        peer_logp = [torch.log_softmax(z.detach().float(), dim=-1) for z in peer_logits]
        cached = self._cached_teacher(batch, main.shape[-1])
        everyone = [main, *peer_logp]
        for j, z in enumerate(peer_logits):
            others = [lp for i, lp in enumerate(everyone) if i != j + 1]
            loss, _ = self.loss_fn(z, self._pooled(others, labels, cached), self.settings)
            (loss / max(batch.num_tokens, 1)).backward()
        return self._pooled(peer_logp, labels, cached)

    def after_step(self, model: Any) -> None:
        for peer, opt, sched in zip(self.peers, self.optimizers, self.schedulers):
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(peer.parameters(), self.cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

    def extra_students(self) -> dict[str, Any]:
        return dict(zip(self._names(), self.peers))

    def _names(self) -> list[str]:
        return [f"peer{i}" for i in range(1, len(self.peers) + 1)]  # peer 0 is the run's own student

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, peer, opt, sched in zip(self._names(), self.peers, self.optimizers, self.schedulers):
            out.update({f"{name}.w.{k}": v.detach().cpu().clone() for k, v in peer.state_dict().items()})
            for pid, st in opt.state_dict()["state"].items():
                out.update({f"{name}.opt.{pid}.{k}": v.detach().cpu().clone() for k, v in st.items()})
            out[f"{name}.sched"] = torch.tensor(sched.last_epoch)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, peer, opt, sched in zip(self._names(), self.peers, self.optimizers, self.schedulers):
            device = next(peer.parameters()).device
            peer.load_state_dict({k.split(".w.", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{name}.w.")})
            state: dict[int, dict[str, torch.Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith(f"{name}.opt."):
                    pid, key = k[len(f"{name}.opt."):].split(".", 1)
                    state.setdefault(int(pid), {})[key] = v if v.dim() == 0 else v.to(device)
            opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
            sched.last_epoch = int(tensors[f"{name}.sched"])
            for group, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * fn(sched.last_epoch)


def build_pseudo_teacher(cfg: Any, model: Any) -> PseudoTeacher | None:
    if pseudo_teacher_options(cfg) is None:  # also refuses an unknown name
        return None
    return PSEUDO_TEACHERS[cfg.pseudo_teacher].build(cfg, model)
