"""Feature-based KD: the student's hidden states, mapped to the teacher's width, match the cached ones.

Each (student layer, teacher layer) pair gets a learnable linear projection from the student's width to the
stored teacher width (FitNets' regressor; a cache written with a random orthogonal projection stores a smaller
width, and the projection maps to that). Matching, per token, summed over the tokens the cache stores:

- ``mse``: mean over dimensions of (W s - t)^2, in the teacher's units;
- ``cosine``: 1 - cos(W s, t), blind to scale (LLM hidden norms grow with depth);
- ``nmse``: ||W s - t||^2 / ||t||^2, a relative error, so deep and shallow layers weigh the same.

Pairs average, so the term's weight does not grow with the number of layers matched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from kdcache.config import doc
from kdcache.errors import ConfigError
from kdcache.train.terms import Needs, Term, TermConfig, TermContext, layer_pairs, register_term, stored_layers, teacher_depth

HIDDEN_FIX = "regenerate the cache with `kdcache generate --set hidden_layers=[LAYERS]`"


@dataclass
class HiddenConfig(TermConfig):
    mapping: Any = doc("Which student layer matches which stored teacher layer: uniform (same relative depth), last, "
                       "or explicit [[student, teacher], ...] (hidden_states numbering: 0 embeddings, L block L's output).", "uniform")
    metric: Literal["mse", "cosine", "nmse"] = doc("mse, cosine (1 - cos) or nmse (||Ws - t||^2 / ||t||^2) per token.", "cosine")
    projection: Literal["linear", "none"] = doc("linear: a learnable student->teacher width map per pair (saved in the run, "
                                                "not in the exported student); none: widths must be equal.", "linear")


def feature_distance(metric: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-token distance [P] between mapped student states and teacher states [P, H]."""
    if metric == "mse":
        return (s - t).pow(2).mean(-1)
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-6)
    return (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)


class HiddenTerm(Term):
    def __init__(self, cfg: HiddenConfig, pairs: list[tuple[int, int]], projections: dict[tuple[int, int], torch.nn.Module | None]):
        super().__init__()
        self.cfg, self.pairs = cfg, pairs
        self._proj = projections  # owned by the run's ModuleDict (shared across stages); not registered here twice
        self.needs = Needs(columns=tuple(sorted({f"hidden_{t}" for _, t in pairs})) + ("hidden_positions",),
                           hidden=tuple(sorted({s for s, _ in pairs})))

    def forward(self, out, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch.signals["hidden_mask"]  # [B, T] positions whose teacher state is stored (padding excluded)
        total = 0.0
        for s, t in self.pairs:
            student = out.hidden[s][mask].float()
            proj = self._proj[(s, t)]
            mapped = proj(student) if proj is not None else student
            total = total + feature_distance(self.cfg.metric, mapped, batch.signals[f"hidden_{t}"][mask]).sum()
        total = total / len(self.pairs)
        return total, {"hidden": total.detach()}


@register_term("hidden", HiddenConfig, "feature KD: student hidden states (projected) match the cached teacher layers")
def build_hidden(cfg: HiddenConfig, ctx: TermContext) -> HiddenTerm:
    stored = stored_layers(ctx.manifest, "hidden")
    pairs = layer_pairs(cfg.mapping, ctx.student_layers, stored, teacher_depth(ctx.manifest, "hidden"), ctx.where,
                        "layer", HIDDEN_FIX)
    width = int(ctx.manifest.signals["hidden"]["size"])
    projections: dict[tuple[int, int], Any] = {}
    for s, t in pairs:
        if cfg.projection == "none":
            if ctx.student_width != width:
                raise ConfigError(f"{ctx.where}: the student's width {ctx.student_width} differs from the cached teacher's {width}; "
                                  f"use --set {ctx.where}.projection=linear (a learned map) or a student of width {width}")
            projections[(s, t)] = None
        else:
            projections[(s, t)] = ctx.projection(f"hidden_s{s}_t{t}", ctx.student_width, width)
    return HiddenTerm(cfg, pairs, projections)
