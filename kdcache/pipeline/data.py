"""Dataset rows in, token sequences with loss masks out.

Rows stream (``datasets`` in streaming mode), so memory does not grow with the dataset. Bad rows are
returned as :class:`BadRow` with a reason, so the caller can count them or, with ``strict``, stop.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from kdcache.errors import DataError
from kdcache.fingerprint import json_hash, tree_fingerprint
from kdcache.pipeline.config import DataConfig
from kdcache.pipeline.corpus import EMBEDDED_DATASETS, EMBEDDED_PREFIX, EMBEDDED_ROWS

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass
class Tokenized:
    input_ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T-1] bool, target t+1 counts
    prompt: np.ndarray | None = None  # prompt tokens, for generation
    truncated: bool = False
    teacher_ids: np.ndarray | None = None  # context distillation: what the teacher scores, context + input_ids
    context_tokens: int = 0  # where input_ids start in teacher_ids
    fields: dict | None = None  # kept dataset fields (keep_fields), copied into the cache as they are
    generate: bool = False  # the teacher continues this row's prompt (generation), instead of scoring it as it is
    teacher_input: dict | None = None  # the row fields a teacher that does not read tokens takes (Teacher.input_fields)


@dataclass
class BadRow:
    reason: str
    detail: str


def dataset_identity(cfg: DataConfig) -> dict:
    src = cfg.source
    ident: dict[str, Any] = {"source": src, "split": cfg.split}
    if cfg.revision is not None:  # only when set: caches made without one keep their settings hash
        ident["revision"] = cfg.revision
    local = src.startswith(EMBEDDED_PREFIX) or Path(src).exists()
    if cfg.revision is not None and local:
        raise DataError(f"data.revision pins a hub dataset's version, but {src} is not one; drop data.revision")
    if src.startswith(EMBEDDED_PREFIX):
        import sys

        ident["fingerprint"] = json_hash([src, sys.version_info[:2]])
    elif Path(src).exists():
        ident["fingerprint"] = tree_fingerprint(src)  # every byte of every file: an edit anywhere is a new dataset
    else:
        # A hub name alone does not pin the rows; with data.revision the identity names the exact version.
        ident["fingerprint"] = json_hash(src) if cfg.revision is None else json_hash([src, cfg.revision])
    return ident


def iter_rows(cfg: DataConfig) -> Iterator[dict]:
    """Raw rows in a fixed order. Raises DataError if the source cannot be opened."""
    src = cfg.source
    if src.startswith(EMBEDDED_PREFIX):
        name = src[len(EMBEDDED_PREFIX) :]
        if name not in EMBEDDED_DATASETS:
            raise DataError(f"unknown embedded dataset {name!r}; available: {', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_DATASETS)}")
        rows: Iterator[dict] = EMBEDDED_ROWS[name]()
    else:
        rows = _load_datasets(src, cfg.split, cfg.revision)
    if cfg.where:
        rows = (row for row in rows if all(name in row and row[name] == value for name, value in cfg.where.items()))
    if cfg.max_rows is not None:
        rows = itertools.islice(rows, cfg.max_rows)
    return rows


def _load_datasets(src: str, split: str, revision: str | None = None) -> Iterator[dict]:
    import datasets

    datasets.logging.set_verbosity_error()
    path = Path(src)
    try:
        if path.exists():
            files = sorted(p for p in path.rglob("*") if p.suffix in _LOADERS) if path.is_dir() else [path]
            if not files:
                raise DataError(f"no .jsonl/.json/.parquet/.csv/.txt files under {src}")
            kinds = {_LOADERS.get(p.suffix) for p in files}
            if None in kinds or len(kinds) != 1:
                raise DataError(f"cannot read {src}: use one of {', '.join(sorted(_LOADERS))} files")
            ds = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train", streaming=True)
        else:
            ds = datasets.load_dataset(src, split=split, streaming=True, revision=revision)
    except DataError:
        raise
    except StopIteration:  # datasets' JSON/CSV builders on a file with no rows
        raise DataError(f"dataset {src!r} has no rows (the file is empty); add rows or pass another --dataset") from None
    except FileNotFoundError as exc:
        raise DataError(f"dataset {src!r} not found: not a local file and not reachable on the hub ({_first_line(exc)})") from None
    except Exception as exc:  # datasets raises many types; report one line
        raise DataError(f"cannot open dataset {src!r}: {_first_line(exc)}") from None
    return _guarded(iter(ds), src)


def _guarded(rows: Iterator[dict], src: str) -> Iterator[dict]:
    """Errors while reading (malformed JSON, an empty CSV) become one-line DataErrors naming the row."""
    index = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - the readers behind datasets raise many types
            raise DataError(f"cannot read row {index} of {src!r} ({type(exc).__name__}: {_first_line(exc)}); fix or remove that row") from None
        yield row
        index += 1


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # how transformers detects template masks


def resolve_format(cfg: DataConfig, first_row: dict, prompts_only: bool = False) -> str:
    """The row format (``cfg.format``, or picked from the first row's fields when auto), failing on a field
    that is not there at all. Needs no tokenizer, so a wrong field is reported before the teacher loads."""
    fields = sorted(first_row)
    fmt = cfg.format
    if fmt == "auto":
        if cfg.field in first_row:
            value = first_row[cfg.field]
            fmt = ("tokens" if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value) else "messages") \
                if isinstance(value, list) else "text"
        elif cfg.prompt_field in first_row and cfg.response_field in first_row:
            fmt = "prompt_response"
        elif "messages" in first_row:
            raise DataError(f"field {cfg.field!r} not in dataset; it has fields {fields}: pass --field messages")
        else:
            raise DataError(f"field {cfg.field!r} not in dataset; it has fields {fields}: pass --field NAME")
    needed = [cfg.field]
    if fmt == "prompt_response":
        needed = [cfg.prompt_field] if prompts_only else [cfg.prompt_field, cfg.response_field]
    for name in needed:
        if name not in first_row:
            raise DataError(f"field {name!r} not in dataset; it has fields {fields}: pass the right field name")
    return fmt


class RowTokenizer:
    """Turns one dataset row into a :class:`Tokenized` or a :class:`BadRow`."""

    def __init__(self, tokenizer: Any, cfg: DataConfig, prompts_only: bool = False):
        self.tok = tokenizer
        self.cfg = cfg
        self.prompts_only = prompts_only
        """For teacher generation: rows need only a prompt (a response, if present, is dropped)."""
        self.format = cfg.format
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        template = getattr(tokenizer, "chat_template", None)
        self.template_masks = bool(getattr(tokenizer, "is_fast", False)) and bool(_GENERATION_TAG.search(str(template or "")))
        """The template marks assistant output with ``{% generation %}``: its own mask is used."""
        self._special: np.ndarray | None = None

    def resolve_format(self, first_row: dict) -> None:
        """Pick the format from the first row, and fail early on a field that is not there at all."""
        self.format = resolve_format(self.cfg, first_row, self.prompts_only)
        if self.format == "messages" and not (self.has_template and self.cfg.chat_template):
            raise DataError("format messages needs a tokenizer with a chat template (and data.chat_template=true)")

    def __call__(self, row: dict) -> Tokenized | BadRow:
        try:
            if self.format == "text":
                return self._text(row)
            if self.format == "messages":
                return self._messages(row[self.cfg.field])
            if self.format == "tokens":
                return self._tokens(row)
            return self._prompt_response(row)
        except _Bad as bad:
            return BadRow(bad.reason, bad.detail)

    # -- formats
    def _get_str(self, row: dict, name: str) -> str:
        if name not in row or row[name] is None:
            raise _Bad("missing_field", f"no field {name!r}")
        value = row[name]
        if not isinstance(value, str):
            raise _Bad("wrong_type", f"field {name!r} is {type(value).__name__}, expected str")
        if not value.strip():
            raise _Bad("empty", f"field {name!r} is empty")
        return value

    def _text(self, row: dict) -> Tokenized | BadRow:
        ids = self.tok(self._get_str(row, self.cfg.field), add_special_tokens=True)["input_ids"]
        return self._finish(ids, np.ones(max(len(ids) - 1, 0), dtype=bool), prompt_len=0)

    def _tokens(self, row: dict) -> Tokenized | BadRow:
        value = row.get(self.cfg.field)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise _Bad("wrong_type", f"field {self.cfg.field!r} must be a list of token ids (integers)")
        ids = np.asarray(value, dtype=np.int64)
        vocab = len(self.tok)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise _Bad("token_out_of_range", f"token id {int(ids.max() if ids.max() >= vocab else ids.min())} is outside the "
                                             f"teacher's tokenizer [0, {vocab})")
        # as text rows: loss on every token; generation continues generation.prompt_tokens of them (or all)
        return self._finish(value, np.ones(max(len(value) - 1, 0), dtype=bool), prompt_len=0)

    def _prompt_response(self, row: dict) -> Tokenized | BadRow:
        prompt = self._get_str(row, self.cfg.prompt_field)
        if self.prompts_only:
            if self.has_template and self.cfg.chat_template:
                return self._messages([{"role": "user", "content": prompt}])
            ids = self.tok(prompt, add_special_tokens=True)["input_ids"]
            return self._finish(ids, np.zeros(max(len(ids) - 1, 0), dtype=bool), prompt_len=len(ids))
        response = self._get_str(row, self.cfg.response_field)
        if self.has_template and self.cfg.chat_template:
            return self._messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
        p = self.tok(prompt, add_special_tokens=True)["input_ids"]
        r = self.tok(response, add_special_tokens=False)["input_ids"]
        if self.tok.eos_token_id is not None:
            r = r + [self.tok.eos_token_id]
        ids = p + r
        mask = np.zeros(len(ids) - 1, dtype=bool)
        mask[len(p) - 1 :] = True
        return self._finish(ids, mask, prompt_len=len(p))

    def _messages(self, messages: Any) -> Tokenized | BadRow:
        if not isinstance(messages, list) or not messages:
            raise _Bad("wrong_type", "messages must be a non-empty list of {role, content}")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise _Bad("wrong_type", "each message needs string 'role' and 'content'")
        if self.prompts_only:
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]  # the teacher writes its own reply
            if not messages:
                raise _Bad("no_prompt", "no message before the assistant reply")
            ids = self._render(messages, add_generation_prompt=True)
            return self._finish(ids, np.zeros(max(len(ids) - 1, 0), dtype=bool), prompt_len=len(ids))
        if not any(m["role"] == "assistant" for m in messages):
            raise _Bad("no_response", "no assistant message")
        ids, targets = self._chat_targets(messages)
        # Token t is a target iff targets[t]; loss_mask[t-1] says whether token t is predicted.
        prompt_len = int(np.argmax(targets)) if targets.any() else 0
        return self._finish(ids, targets[1:], prompt_len=prompt_len)

    def _chat_targets(self, messages: list) -> tuple[list[int], np.ndarray]:
        """Token ids of the whole conversation and, per token, whether it is a loss target.

        Targets are, for each assistant message, its content tokens and the template's end-of-turn
        token (so the student learns to stop); not the role header (``<|im_start|>assistant\\n``),
        not the template tokens after the end-of-turn token (ChatML's newline after ``<|im_end|>``),
        nothing of other roles. Two ways to find them, in this order:

        1. A template with ``{% generation %}`` markers: its own assistant mask
           (``return_assistant_tokens_mask``), as the template's author drew it; one render.
        2. Otherwise, verified prefixes. For assistant message ``i`` the conversation up to it is
           rendered with the generation prompt (its end is where the content starts) and the
           conversation through it (its end is where the turn ends); both must be token prefixes of
           the whole rendering, compared token by token. Within the turn, targets stop at the last
           special token (the end-of-turn token; a turn without one keeps all its tokens). A template
           that rewrites history (drops earlier ``<think>`` blocks), a system block that changes
           between renders (a date stamp) or a BPE merge across the turn boundary breaks the
           property: the row is a bad row ``chat_template_not_prefix_stable`` instead of a shifted
           mask. At most two renders per assistant message plus one of the whole conversation.
        """
        if self.template_masks:
            out = self._apply(messages, add_generation_prompt=False, return_assistant_tokens_mask=True, return_dict=True)
            targets = np.asarray(out["assistant_masks"], dtype=bool)
            if targets.any():
                return list(out["input_ids"]), targets
            # markers that mark nothing in this conversation: fall back to verified prefixes
        full = np.asarray(self._render(messages, add_generation_prompt=False), dtype=np.int64)
        targets = np.zeros(len(full), dtype=bool)
        special = self._special_ids()
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise _Bad("no_prompt", "the conversation starts with an assistant message: where its content starts cannot be verified")
            start = self._verified_prefix(full, messages[:i], add_generation_prompt=True)
            end = len(full) if i == len(messages) - 1 else self._verified_prefix(full, messages[: i + 1], add_generation_prompt=False)
            if end <= start:
                raise _Bad("chat_template_not_prefix_stable", f"assistant message {i} renders to no tokens after its header")
            eot = np.flatnonzero(np.isin(full[start:end], special))
            targets[start : start + int(eot[-1]) + 1 if eot.size else end] = True
        return full.tolist(), targets

    def _verified_prefix(self, full: np.ndarray, prefix: list, add_generation_prompt: bool) -> int:
        head = np.asarray(self._render(prefix, add_generation_prompt=add_generation_prompt), dtype=np.int64)
        n = len(head)
        if n > len(full) or not np.array_equal(full[:n], head):
            m = min(n, len(full))
            at = int(np.argmax(full[:m] != head[:m])) if (full[:m] != head[:m]).any() else m
            raise _Bad(
                "chat_template_not_prefix_stable",
                f"the chat template renders the first {len(prefix)} messages{' + generation prompt' if add_generation_prompt else ''} "
                f"to tokens that are not a prefix of the whole conversation (they differ from token {at} on); "
                "the assistant mask cannot be placed (a template that rewrites history or dates its system block?)",
            )
        return n

    def _special_ids(self) -> np.ndarray:
        if self._special is None:
            ids = set(getattr(self.tok, "all_special_ids", []) or [])
            ids |= {i for i, t in (getattr(self.tok, "added_tokens_decoder", {}) or {}).items() if getattr(t, "special", False)}
            self._special = np.asarray(sorted(ids), dtype=np.int64)
        return self._special

    def _render(self, messages: list, add_generation_prompt: bool) -> list[int]:
        out = self._apply(messages, add_generation_prompt=add_generation_prompt)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    def _apply(self, messages: list, **kw: Any) -> Any:
        from jinja2 import TemplateError

        try:
            return self.tok.apply_chat_template(messages, tokenize=True, **kw)
        except TemplateError as exc:  # raise_exception() in the template, undefined names
            raise _Bad("chat_template_error", f"the chat template refused this conversation: {_first_line(exc)}") from None

    def _finish(self, ids: list[int], mask: np.ndarray, prompt_len: int) -> Tokenized | BadRow:
        truncated = False
        if len(ids) > self.cfg.max_length:
            if self.cfg.truncation == "skip":
                raise _Bad("too_long", f"{len(ids)} tokens > max_length {self.cfg.max_length}")
            ids = ids[: self.cfg.max_length]
            mask = mask[: self.cfg.max_length - 1]
            truncated = True
        if len(ids) < 2:
            raise _Bad("too_short", "fewer than 2 tokens")
        if not mask.any() and not self.prompts_only:
            raise _Bad("no_loss_tokens", "no target token left to learn (all masked or truncated away)")
        arr = np.asarray(ids, dtype=np.int32)
        prompt = arr[: min(prompt_len, len(arr))] if prompt_len else None
        return Tokenized(arr, mask.astype(bool), prompt=prompt, truncated=truncated)


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
