"""Layer-wise self-distillation: the student's final layer teaches its own shallower exits.

Each exit is block L's output put through the shared final norm and LM head (no new parameters); its target
is the student's own final prediction at that position, detached, kept as a top-k + tail like a cache row,
so the loss is the fused sparse KD (``T^2 KL(final || exit)``) mixed with hard-label CE by ``alpha``. No
teacher signal is needed. The deeper layers lead, and the shallow ones learn to predict early (early-exit
inference, "Be Your Own Teacher"). With ``save_exits`` every exit is also saved as its own truncated model
under ``final/exits/layer-L`` (evaluated like the student); otherwise the saved student is the full model only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from kdcache.config import FRACTION, POSITIVE, doc
from kdcache.errors import ConfigError
from kdcache.train.losses import LossSettings, sparse_kd_loss
from kdcache.train.pseudo_teachers import topk_targets
from kdcache.train.terms import Needs, Term, TermConfig, TermContext, register_term


@dataclass
class ExitsConfig(TermConfig):
    layers: list[int] = doc("Blocks whose outputs are exits (empty: every block but the last).", default_factory=list)
    temperature: float = doc("Temperature of the final-layer -> exit KD.", 1.0, valid=POSITIVE)
    alpha: float = doc("Weight of the soft target at each exit; 1 - alpha goes to hard-label CE there.", 0.5, valid=FRACTION)
    top_k: int = doc("Top-k of the final layer's prediction kept as each exit's target (plus the tail mass).", 64, valid=POSITIVE)
    save_exits: bool = doc("Also save each exit as a truncated model in final/exits/layer-L (evaluated at the end).", False)


class ExitsTerm(Term):
    def __init__(self, cfg: ExitsConfig, layers: list[int], norm: Any, head: Any):
        super().__init__()
        self.cfg, self.layers = cfg, layers
        self._student = (norm, head)  # the student's own modules, in a tuple so they are not registered here twice
        self.needs = Needs(hidden=tuple(layers))

    def forward(self, out, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        final = topk_targets(out.logits.detach(), batch.targets.labels, self.cfg.top_k, self.cfg.temperature)
        settings = LossSettings(temperature=self.cfg.temperature, alpha=self.cfg.alpha)
        total, metrics = 0.0, {}
        for layer in self.layers:
            h = out.hidden[layer][:, :-1][batch.select]
            norm, head = self._student
            loss, parts = sparse_kd_loss(head(norm(h)), final, settings)
            total = total + loss
            metrics[f"exit{layer}_kd"] = parts["kd"]
        total = total / len(self.layers)
        return total, {"exits": total.detach(), **metrics}

    def exports(self, model: Any) -> dict[str, Any]:
        return {f"layer-{layer}": truncated(model, layer) for layer in self.layers} if self.cfg.save_exits else {}


def truncated(model: Any, layers: int) -> Any:
    """A copy of a decoder-only model keeping its first ``layers`` blocks (then the final norm and head)."""
    m = copy.deepcopy(model)
    decoder = m.get_decoder()
    decoder.layers = decoder.layers[:layers]
    cfg = m.config.get_text_config()
    cfg.num_hidden_layers = layers
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:layers]
    return m


@register_term("exits", ExitsConfig, "layer-wise self-distillation: the student's final prediction teaches exits at shallower blocks")
def build_exits(cfg: ExitsConfig, ctx: TermContext) -> ExitsTerm:
    n = ctx.student_layers
    layers = sorted(set(cfg.layers)) or list(range(1, n))
    if not layers or any(not 1 <= layer < n for layer in layers):
        raise ConfigError(f"{ctx.where}.layers must be blocks 1..{n - 1} of the {n}-block student (the last one is the teacher), "
                          f"got {cfg.layers or layers}; e.g. --set {ctx.where}.layers=[{max(n // 2, 1)}]")
    decoder = ctx.model.get_decoder()
    head = ctx.model.get_output_embeddings()
    if getattr(decoder, "norm", None) is None or head is None:
        raise ConfigError(f"{ctx.where}: the student has no final norm + LM head to read exits through; use a decoder-only student (arch llama)")
    return ExitsTerm(cfg, layers, decoder.norm, head)
