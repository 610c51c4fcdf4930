"""Context distillation: the teacher reads a context that the student never sees.

A context (a system prompt, few-shot examples, a document) is a template rendered per row, its ``{field}``
placeholders filled from the row's fields. The teacher scores ``context + input_ids`` and the cache keeps
only the positions of ``input_ids``, so every stored distribution is the prompted teacher's prediction of
the student's next token: a student trained on the cache learns to behave as if it had read the context.

The two parts are tokenized separately and joined as token ids (never as text), so the student's tokens
appear unchanged at the end of the teacher's sequence whatever the tokenizer merges; a leading BOS the
tokenizer adds to both is kept once, the context's. The alignment is the offset ``context_tokens`` per row
(a column of the cache): row position t is teacher position ``context_tokens + t``, and the number of scored
positions is checked against it for every row.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.cache.schema import SAMPLED_COLUMNS, TEMPERED_TAIL_COLUMN, TOPK_COLUMNS
from kdcache.errors import ConfigError, KDCacheError

#: Score arrays with one row per target (predicting token t+1) and one row per token.
_PER_TARGET = (*TOPK_COLUMNS, TEMPERED_TAIL_COLUMN, "target_logprob", "entropy")
_PER_TOKEN_PREFIXES = ("hidden_", "qkv_")


def placeholders(template: str) -> list[str]:
    """The row fields a context template reads (``{name}``; ``{{``/``}}`` are literal braces)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"context template {template[:60]!r}: {exc}; write literal braces as {{{{ and }}}}") from None
    for name in names:
        if not name.isidentifier():
            raise ConfigError(f"context placeholder {{{name}}} must be a plain field name, e.g. {{source}}")
    return list(dict.fromkeys(names))


def student_fields(data: Any, fmt: str) -> list[str]:
    """The row fields the student's tokens come from, for a resolved row format."""
    return [data.prompt_field, data.response_field] if fmt == "prompt_response" else [data.field]


@dataclass
class TeacherContext:
    """A context template bound to the teacher's tokenizer."""

    template: str
    tokenizer: Any
    fields: tuple[str, ...] = ()

    @classmethod
    def build(cls, template: str, tokenizer: Any) -> TeacherContext:
        return cls(template, tokenizer, tuple(placeholders(template)))

    def render(self, row: dict) -> str:
        return self.template.format_map({name: row[name] for name in self.fields})

    def ids(self, row: dict) -> np.ndarray | None:
        """The context's token ids for this row, or None when a field it reads is missing or not text."""
        for name in self.fields:
            if not isinstance(row.get(name), str):
                return None
        ids = self.tokenizer(self.render(row), add_special_tokens=True)["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    def settings(self) -> dict:
        return {
            "template": self.template,
            "alignment": "the teacher scored context + input_ids; row position t is teacher position context_tokens + t",
        }


def check_template(template: str, first_row: dict, student: list[str]) -> None:
    """Refuse, before any work, a context that names a missing field or would overlap the student's tokens."""
    fields = placeholders(template)
    if not template.strip():
        raise ConfigError("context is empty; pass --set context='TEXT' (placeholders like {source} read row fields) or drop it")
    for name in fields:
        if name in student:
            raise ConfigError(
                f"context placeholder {{{name}}} is the student's own input field: the context would overlap the student's "
                f"tokens; put the teacher-only text in another field")
        if name not in first_row:
            raise ConfigError(f"context placeholder {{{name}}} is not a field of the dataset (it has {sorted(first_row)}); "
                              "fix the placeholder or add the field")
        if not isinstance(first_row[name], str):
            raise ConfigError(f"context placeholder {{{name}}} reads a {type(first_row[name]).__name__} field; a context is made of "
                              "text fields only (store the value as text in the data)")
    rendered = template.format_map({name: str(first_row[name]) for name in fields}).strip()
    for name in student:
        text = first_row.get(name)
        if isinstance(text, str) and rendered and rendered in text:
            raise ConfigError(
                f"the student's input (field {name!r} of row 0) already contains the context: the context would overlap the "
                "student's tokens; remove it from the data or from --set context")


def teacher_sequence(context_ids: np.ndarray, input_ids: np.ndarray, bos_token_id: int | None) -> tuple[np.ndarray, int]:
    """The teacher's input and the offset of the student's row position 0 in it."""
    skip = int(bos_token_id is not None and len(context_ids) > 0 and len(input_ids) > 1
               and input_ids[0] == bos_token_id and context_ids[0] == bos_token_id)
    return np.concatenate([context_ids, input_ids[skip:]]).astype(np.int32), len(context_ids) - skip


def align(scores: dict[str, np.ndarray], offset: int, num_tokens: int, longer: bool = False) -> dict[str, np.ndarray]:
    """The teacher's scores of ``context + input`` cut to the student's ``num_tokens`` tokens.

    Per-target arrays keep rows ``offset .. offset + num_tokens - 2``, per-token arrays (hidden states, q/k/v)
    rows ``offset .. offset + num_tokens - 1``; sampled targets (flat, with a size per position) keep the
    draws of the kept positions. A score the function does not know is an error, never passed through
    misaligned. ``longer``: the teacher may have scored more tokens after the row (a continuation cut to
    max_length), which are dropped."""
    n = num_tokens - 1
    out: dict[str, np.ndarray] = {}
    scored = len(scores["target_logprob"])
    if scored != offset + n and not (longer and scored > offset + n):
        raise KDCacheError(f"the teacher scored {scored} positions for a context of {offset} tokens and {num_tokens} input tokens; "
                           f"expected {offset + n} (context alignment broken)")
    for name, value in scores.items():
        if name in _PER_TARGET:
            out[name] = value[offset: offset + n]
        elif name.startswith(_PER_TOKEN_PREFIXES):
            out[name] = value[offset: offset + num_tokens]
        elif name not in SAMPLED_COLUMNS:
            raise KDCacheError(f"context alignment does not know the teacher's score {name!r}; add it to kdcache/pipeline/context.py")
    if "sampled_sizes" in scores:
        sizes = scores["sampled_sizes"]
        start, stop = int(sizes[:offset].sum()), int(sizes[: offset + n].sum())
        out["sampled_sizes"] = sizes[offset: offset + n]
        out["sampled_ids"] = scores["sampled_ids"][start:stop]
        out["sampled_weights"] = scores["sampled_weights"][start:stop]
    return out
