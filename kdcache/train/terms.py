"""Loss terms beyond the logit loss, and their registry.

A run's objective is its logit loss (``loss``, mixed with hard labels by ``alpha``) plus weighted ``terms``
that read what the logits cannot carry: the teacher's hidden states, its attention, the student's own
deeper layers. In YAML::

    loss: kd
    terms:
      hidden: {weight: 0.5, metric: cosine, mapping: uniform}
      attention: 1.0            # a number is the weight, every other field at its default

Each term owns a typed config section (a dataclass with ``weight``), parsed and validated only when a run
uses it, so a term with parameters needs no field in :class:`TrainConfig`. A term declares what it reads:
cache columns, student hidden states of given layers (``hidden_states[L]`` numbering: 0 the embeddings,
L the output of block L, the last one after the final norm), the query/key/value projections of given
blocks. The trainer hooks exactly those modules, so the only activations kept beyond the logits' are the
ones some term asked for. A term's parameters (projections to the teacher's width) are trained with the
student and saved in the run's checkpoints, never in the exported student.

Add a term: a config dataclass (subclass :class:`TermConfig`), a build function decorated with
``@register_term(name, ConfigClass, help)`` in its own module, imported in ``kdcache/train/objective.py``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kdcache.config import NON_NEGATIVE, Section, doc, from_dict
from kdcache.errors import ConfigError


@dataclass
class TermConfig(Section):  # ranges checked when built (Section)
    weight: float = doc("Weight of this term in the run's loss (the logit loss has weight 1).", 1.0, valid=NON_NEGATIVE)


@dataclass
class Needs:
    """What a term reads: cache columns, student hidden states (by layer), student q/k/v (by block)."""

    columns: tuple[str, ...] = ()
    hidden: tuple[int, ...] = ()
    qkv: tuple[int, ...] = ()


@dataclass
class StudentOutputs:
    """The student's forward on one micro-batch: logits at the selected targets, and the tapped activations."""

    logits: torch.Tensor  # [N, V]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, T, H]
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # block -> q, k, v [B, T, *]


class Term(torch.nn.Module):
    """A loss term: ``forward(out, batch)`` returns (a SUM over the batch's tokens, {metric: detached sum})."""

    needs: Needs

    def exports(self, model: Any) -> dict[str, Any]:
        """Extra models saved under ``final/`` and evaluated at the end (e.g. early exits); none by default."""
        return {}


@dataclass
class TermContext:
    """What a term's build function may look at: the student, the cache, and the run's shared projections."""

    model: Any
    manifest: Any
    columns: list[str]
    projections: torch.nn.ModuleDict
    where: str  # the config key of the term's section, for error messages (e.g. "stages[1].terms.hidden")

    @property
    def student_layers(self) -> int:
        return int(self.model.config.get_text_config().num_hidden_layers)

    @property
    def student_width(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    def projection(self, key: str, d_in: int, d_out: int) -> torch.nn.Linear:
        """A learnable map ``d_in -> d_out``, one per key for the whole run (stages using the same pair share it)."""
        if key not in self.projections:
            gen = torch.Generator().manual_seed(len(self.projections))  # deterministic, whatever the global RNG did
            lin = torch.nn.Linear(d_in, d_out, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(d_out, d_in, generator=gen) / d_in**0.5)
            self.projections[key] = lin
        return self.projections[key]


@dataclass(frozen=True)
class TermSpec:
    config: type[TermConfig]
    build: Callable[[Any, TermContext], Term]
    help: str


TERMS: dict[str, TermSpec] = {}


def register_term(name: str, config: type[TermConfig], help: str) -> Callable:
    def deco(build: Callable[[Any, TermContext], Term]):
        if name in TERMS:
            raise ValueError(f"term {name!r} registered twice")
        TERMS[name] = TermSpec(config, build, help)
        return build

    return deco


def term_config(name: str, section: Any, where: str) -> TermConfig:
    """A term's section as its dataclass: ``0.5`` means ``{weight: 0.5}``; unknown names and keys are refused."""
    if name not in TERMS:
        close = difflib.get_close_matches(name, list(TERMS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown loss term {where}; {hint}valid terms: {', '.join(sorted(TERMS))}")
    if isinstance(section, (int, float)) and not isinstance(section, bool):
        section = {"weight": section}
    if section is None:
        section = {}
    if isinstance(section, TermConfig):
        return section
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a weight or a mapping of that term's fields, got {section!r}")
    return from_dict(TERMS[name].config, section, where)


def stored_layers(manifest: Any, signal: str) -> list[int]:
    return [int(x) for x in (manifest.signals.get(signal) or {}).get("layers", [])]


def layer_pairs(mapping: Any, student_layers: int, teacher_stored: list[int], teacher_depth: int, where: str,
                kind: str, fix: str, first: int = 0) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs from a mapping: ``uniform`` (each stored teacher layer t to the student
    layer at the same relative depth, round(t * L_s / L_t)), ``last`` (last to last) or explicit ``[[s, t], ...]``."""
    if not teacher_stored:
        raise ConfigError(f"{where} needs the cache's {kind}, which it lacks; {fix}")
    if mapping == "last":
        if teacher_depth not in teacher_stored:
            raise ConfigError(f"{where}.mapping last needs the teacher's last {kind} ({teacher_depth}), but the cache holds "
                              f"{teacher_stored}; {fix.replace('LAYERS', '-1')} or give an explicit mapping [[s, t], ...]")
        return [(student_layers, teacher_depth)]
    if mapping == "uniform":
        return [(max(first, min(student_layers, round(t * student_layers / teacher_depth))), t) for t in sorted(teacher_stored)]
    if isinstance(mapping, str):
        raise ConfigError(f"{where}.mapping must be uniform, last or a list of [student, teacher] pairs, got {mapping!r}")
    pairs = []
    for pair in mapping:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, int) for x in pair)):
            raise ConfigError(f"{where}.mapping entries must be [student, teacher] pairs of integers, got {pair!r}")
        s, t = pair
        if t not in teacher_stored:
            raise ConfigError(f"{where}.mapping pairs the teacher's {kind} {t}, which the cache does not hold (it has "
                              f"{teacher_stored}); map one of those or {fix.replace('LAYERS', str(t))}")
        if not first <= s <= student_layers:
            raise ConfigError(f"{where}.mapping pairs student {kind} {s}, but the student has {kind}s {first}..{student_layers}; "
                              "pick one in that range")
        pairs.append((s, t))
    if not pairs:
        raise ConfigError(f"{where}.mapping is empty; give at least one [student, teacher] pair, or uniform / last")
    return pairs


def teacher_depth(manifest: Any, signal: str) -> int:
    """The teacher's number of blocks, for depth-relative mappings: recorded with the signal, or read from the
    hidden layers' descriptions (the one after the final norm is the last); else the deepest stored layer."""
    info = manifest.signals.get(signal) or {}
    for key in ("teacher_layers", "num_layers"):
        if info.get(key):
            return int(info[key])
    described = (manifest.settings.get("scoring") or {}).get("hidden_tensors") or {}
    for layer, text in described.items():
        if "after the final norm" in str(text):
            return int(layer)
    return max(stored_layers(manifest, signal) or [1])
