"""A run's objective, stage by stage: the logit loss plus weighted terms, and the student taps they need.

Without ``stages`` a run has one objective (``loss`` + ``terms``). With them, each stage may change the logit
loss, alpha, the terms (and so the layers targeted) and the frozen modules; a stage is a function of the step,
so a resumed run is in the same stage with the same objective. Every stage's terms are built before training,
so the optimizer holds every projection from step 0 and resuming across a stage boundary is exact.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from kdcache.errors import ConfigError
from kdcache.modeling import attention_modules, decoder_layer_modules, output_hooks, selected_logits
from kdcache.train.exits import build_exits
from kdcache.train.features import build_hidden
from kdcache.train.relations import build_attention
from kdcache.train.config import TrainConfig
from kdcache.train.data import Batch
from kdcache.train.losses import LossSettings, LossSpec, get_loss
from kdcache.train.terms import TERMS, Needs, StudentOutputs, Term, TermContext, term_config

# Importing a term's module registers it: add a term with its module and one import here.
BUILT_IN_TERMS = (build_exits, build_hidden, build_attention)


@dataclass
class Objective:
    """One stage's loss. ``loss`` is None for a stage of terms only."""

    loss_name: str
    loss: LossSpec | None
    alpha: float | None  # the stage's own alpha (None: the run's alpha and its schedule)
    terms: list[tuple[str, float, Term]]
    frozen: list[torch.nn.Parameter]
    start: int
    end: int  # exclusive

    @property
    def needs(self) -> Needs:
        parts = [t.needs for _, _, t in self.terms]
        return Needs(tuple(sorted({c for p in parts for c in p.columns} | set(self.loss.needs if self.loss else ()))),
                     tuple(sorted({h for p in parts for h in p.hidden})), tuple(sorted({q for p in parts for q in p.qkv})))

    def __call__(self, out: StudentOutputs, batch: Batch, settings: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.loss is not None:
            total, metrics = self.loss.fn(out.logits, batch.targets, settings)
        else:
            total, metrics = out.logits.new_zeros(()), {}
        for _, weight, term in self.terms:
            value, parts = term(out, batch)
            total = total + weight * value
            metrics.update(parts)
        return total, metrics


def build_objectives(cfg: TrainConfig, model: Any, cache: Any) -> tuple[list[Objective], torch.nn.ModuleDict]:
    """Every stage's objective (one without stages) and the run's learnable projections, checked before training."""
    projections = torch.nn.ModuleDict()
    stages = cfg.stages or []
    if not stages:
        return [_objective(cfg, model, cache, projections, cfg.loss, None, cfg.terms, [], "terms", 0, cfg.steps)], projections
    planned = sum(s.steps for s in stages)
    if planned > cfg.steps or (planned < cfg.steps and stages[-1].steps):
        raise ConfigError(f"the stages' steps add up to {planned} but the run has steps {cfg.steps}; make them equal "
                          f"(--set steps={planned}) or give the last stage steps 0 (it then runs until the end)")
    out, start = [], 0
    for i, st in enumerate(stages):
        end = start + st.steps if st.steps else cfg.steps
        terms = cfg.terms if st.terms is None else st.terms
        out.append(_objective(cfg, model, cache, projections, st.loss or cfg.loss, st.alpha, terms, st.freeze,
                              f"stages[{i}].terms" if st.terms is not None else "terms", start, end, f"stages[{i}]"))
        start = end
    return out, projections


def _objective(cfg, model, cache, projections, loss_name, alpha, terms, freeze, where, start, end, stage="") -> Objective:
    loss = None if loss_name == "none" else get_loss(loss_name)
    built = []
    for name, section in (terms or {}).items():
        tc = term_config(name, section, f"{where}.{name}")
        ctx = TermContext(model, cache.manifest, cache.columns, projections, f"{where}.{name}")
        built.append((name, tc.weight, TERMS[name].build(tc, ctx)))
    if loss is None and not built:
        raise ConfigError(f"{stage or 'the run'} has loss none and no terms: nothing to train; set a loss or add terms")
    return Objective(loss_name, loss, alpha, built, frozen_parameters(model, freeze, f"{stage}.freeze" if stage else "freeze"), start, end)


def frozen_parameters(model: Any, patterns: list[str], where: str) -> list[torch.nn.Parameter]:
    """Parameters whose names match any glob pattern; a pattern that matches nothing is a typo, refused."""
    named = list(model.named_parameters(remove_duplicate=False))  # a tied lm_head.weight is named too
    frozen: dict[int, torch.nn.Parameter] = {}
    for pattern in patterns:
        hits = [p for n, p in named if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*")]
        if not hits:
            sample = ", ".join(n for n, _ in named[:3])
            raise ConfigError(f"{where}: {pattern!r} matches no student parameter (names look like {sample}); "
                              "fix the pattern (globs over `model.named_parameters()`, e.g. model.layers.0)")
        frozen.update({id(p): p for p in hits})
    return list(frozen.values())


def stage_at(objectives: list[Objective], step: int) -> Objective:
    for obj in objectives:
        if obj.start <= step < obj.end:
            return obj
    return objectives[-1]


@contextlib.contextmanager
def taps(model: Any, needs: Needs) -> Iterator[tuple[dict[int, torch.Tensor], dict[int, list]]]:
    """Forward hooks on exactly the modules a term reads; yields ({layer: [B, T, H]}, {block: (q, k, v)})."""
    hooked: dict[tuple[str, int, int], Any] = {}
    if needs.hidden:
        modules = decoder_layer_modules(model)
        if modules is None:
            raise ConfigError("hidden-state terms need a decoder laid out as embed_tokens/layers/norm (e.g. student.arch llama)")
        hooked.update({("hidden", layer, 0): modules[layer] for layer in needs.hidden})
    if needs.qkv:
        blocks = attention_modules(model, list(needs.qkv))
        if isinstance(blocks, str):
            raise ConfigError(f"the attention term needs the student's q/k/v projections: {blocks}; use a student.arch llama student")
        hooked.update({("qkv", b, j): m for b, mods in blocks.items() for j, m in enumerate(mods)})
    hidden: dict[int, torch.Tensor] = {}
    qkv: dict[int, list] = {}
    with output_hooks(hooked) as got:
        yield hidden, qkv
    for (kind, index, j), value in got.items():
        if kind == "hidden":
            hidden[index] = value
        else:
            qkv.setdefault(index, [None, None, None])[j] = value


def forward(model: Any, batch: Batch, objective: Objective, settings: LossSettings, autocast) -> tuple[torch.Tensor, dict]:
    """The student on one micro-batch and the stage's loss on it (a sum over tokens)."""
    needs = objective.needs
    with autocast(), taps(model, needs) as (hidden, qkv):
        logits = selected_logits(model, batch.input_ids, batch.attention_mask, batch.select)
    return objective(StudentOutputs(logits, hidden, {b: tuple(v) for b, v in qkv.items()}), batch, settings)
