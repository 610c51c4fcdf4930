"""The generate stage: run the teacher once over a dataset and write a cache.

Everything that can be checked without the weights (paths, k against the vocab, an existing cache's
settings, the dataset's fields) is checked before the teacher loads, so mistakes cost seconds.

Ctrl-C (and SIGTERM, which the CLI turns into KeyboardInterrupt) becomes :class:`Interrupted`, whose
message reports what the manifest on disk actually lists, so the user knows what a rerun resumes from.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from kdcache.cache import CacheWriter, Manifest, make_signals, read_manifest
from kdcache.cache.background import BackgroundWriter
from kdcache.cache.filesystem import as_path
from kdcache.cache.writer import install_tokenizer
from kdcache.cache.hidden import orthogonal_projection, parse_positions, select_positions
from kdcache.cache.schema import CLASS_LOGITS_COLUMN, CONTEXT_COLUMN, HIDDEN_POSITIONS_COLUMN, SAMPLED_COLUMNS, TEMPERED_TAIL_COLUMN, TOPK_COLUMNS, pooled_column
from kdcache.config import plural, to_dict
from kdcache.errors import CacheFormatError, ConfigError, DataError, Interrupted
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.pipeline.config import GenerateConfig
from kdcache.pipeline.context import TeacherContext, align, check_template, student_fields, teacher_sequence
from kdcache.pipeline.fields import field_value, kept_field_types
from kdcache.pipeline.data import BadRow, RowTokenizer, Tokenized, dataset_identity, iter_rows, resolve_format
from kdcache.pipeline.sharding import is_part, job_array_settings, keeps, part_config
from kdcache.pipeline.teachers import GenerateRequest, Request, ScoreRequest, Teacher, build_teacher, resolve_blocks, resolve_layers
from kdcache.pipeline.teachers.sampling import SparseSampling

log = logging.getLogger(__name__)


def tokenizer_record(tokenizer, vocab_size: int) -> dict:
    return {
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "tokenizer_size": len(tokenizer),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


@dataclasses.dataclass
class _Stored:
    """What of the teacher's hidden states and attention each example stores (from the config, checked)."""

    layers: list[int]
    positions: str = "all"
    seed: int = 0
    projection: np.ndarray | None = None  # [H, D], or None: full width
    attention: dict | None = None  # describe_attention() of the chosen blocks, or None
    pooled: list[int] = dataclasses.field(default_factory=list)  # layers pooled into one vector per example
    pooling: str = "mean"

    @property
    def qkv_layers(self) -> list[int]:
        return list(self.attention["layers"]) if self.attention else []

    @property
    def captured(self) -> list[int]:
        """Layers the teacher must return per token: the stored ones and the pooled ones."""
        return sorted(set(self.layers) | set(self.pooled))


def _stored(cfg: GenerateConfig, teacher: Teacher) -> _Stored:
    """Everything about hidden states and attention that can be refused without the weights, refused here."""
    layers = resolve_layers(cfg.hidden_layers, teacher.num_layers)
    projection = None
    if cfg.hidden_project_dim:
        H = teacher.hidden_size
        if cfg.hidden_project_dim >= H:
            raise ConfigError(
                f"hidden_project_dim {cfg.hidden_project_dim} must be smaller than the teacher's hidden size {H} "
                f"(a projection to {H} or more stores nothing less); pass --set hidden_project_dim=D with D < {H}, or 0 for full width")
        projection = orthogonal_projection(H, cfg.hidden_project_dim, cfg.hidden_project_seed)
    blocks = resolve_blocks(cfg.attention_layers, teacher.num_layers)
    attention = teacher.describe_attention(blocks) if blocks else None
    pooled = resolve_layers(cfg.pooled_layers, teacher.num_layers)
    return _Stored(layers, cfg.hidden_positions, cfg.seed, projection, attention, pooled, cfg.pooling)


def _settings(cfg: GenerateConfig, teacher: Teacher, layers: list[int], stored: _Stored | None = None) -> dict:
    stored = stored or _Stored(layers)
    positions = parse_positions(cfg.hidden_positions)[0]
    gen = to_dict(cfg.generation)
    if gen.get("rows") == "all":  # the default, absent from caches made before the setting existed
        del gen["rows"]
    if cfg.generation.do_sample:
        gen["sampler"] = teacher.sampler
    return {
        "teacher": teacher.identity(),
        "tokenizer": tokenizer_record(teacher.tokenizer, teacher.vocab_size),
        # identity has revision when set; `where` only when set, so caches made before it existed keep their settings hash
        "dataset": {**dataset_identity(cfg.data), **{k: v for k, v in to_dict(cfg.data).items()
                                                     if k not in ("source", "split", "strict", "revision") and (k != "where" or v)}},
        "scoring": {
            "top_k": cfg.top_k, "hidden_layers": layers, "logprob_codec": cfg.logprob_codec,
            # only when not the default, so caches made before codecs existed keep their settings hash
            **({"codec": cfg.codec, "codec_options": dict(cfg.codec_options)} if cfg.codec != "lists" or cfg.codec_options else {}),
            "hidden_codec": cfg.hidden_codec, "entropy": teacher.entropy_kind,
            **({"hidden_tensors": teacher.describe_layers(layers)} if layers else {}),
            **({"tail_temperatures": [float(t) for t in cfg.tail_temperatures]} if cfg.tail_temperatures else {}),
            **({"hidden_project_dim": cfg.hidden_project_dim, "hidden_project_seed": cfg.hidden_project_seed}
               if layers and cfg.hidden_project_dim else {}),
            **({"hidden_positions": cfg.hidden_positions} if layers and positions != "all" else {}),
            **({"hidden_positions_seed": cfg.seed} if layers and positions == "fraction" else {}),
            **({"attention_layers": stored.qkv_layers, "attention_tensors": stored.attention} if stored.attention else {}),
            **({"sampled_tokens": cfg.sampled_tokens, "proposal_temperature": cfg.proposal_temperature} if cfg.sampled_tokens else {}),
            **({"context": cfg.context} if cfg.context else {}),
            **({"pooled_layers": stored.pooled, "pooling": cfg.pooling} if stored.pooled else {}),
            **({"keep_fields": list(cfg.keep_fields)} if cfg.keep_fields else {}),
        },
        "generation": gen if cfg.generation.enabled else {"enabled": False},
        "seed": cfg.seed if (cfg.generation.enabled and cfg.generation.do_sample) or cfg.sampled_tokens else None,
        **job_array_settings(cfg),  # a part of a job array only: one process's cache keeps its settings hash
    }


def _continues_every_row(cfg: GenerateConfig) -> bool:
    return cfg.generation.enabled and cfg.generation.rows == "all"


def _row_tokenizer(cfg: GenerateConfig, tokenizer, first: dict):
    """Row -> Tokenized (``generate`` set on the rows the teacher continues) or BadRow."""
    every = RowTokenizer(tokenizer, cfg.data, prompts_only=_continues_every_row(cfg))
    every.resolve_format(first)
    if not cfg.generation.enabled:
        return every
    if cfg.generation.rows == "all":
        return lambda row: _marked(every(row))
    prompts = RowTokenizer(tokenizer, cfg.data, prompts_only=True)
    prompts.resolve_format(first)
    field = cfg.data.response_field

    def tokenize(row: dict) -> Tokenized | BadRow:
        response = row.get(field)
        unanswered = response is None or (isinstance(response, str) and not response.strip())
        return _marked(prompts(row)) if unanswered else every(row)

    return tokenize


def _marked(item: Tokenized | BadRow) -> Tokenized | BadRow:
    return dataclasses.replace(item, generate=True) if isinstance(item, Tokenized) else item


def _save_tokenizer(tokenizer, out: Path) -> None:
    """A copy of the tokenizer travels with the cache, so students can be built from a config spec."""
    install_tokenizer(out, tokenizer.save_pretrained)


def _batches(
    items: Iterator[tuple[int, object]], batch_tokens: int, max_rows: int = 256, padded: bool = True
) -> Iterator[list[tuple[int, object]]]:
    """Consecutive rows whose size fits the token budget (padded: longest x rows; else the sum of
    lengths); bad rows ride along at no cost."""
    batch: list[tuple[int, object]] = []
    longest = good = total = 0
    for index, item in items:
        is_good = isinstance(item, Tokenized)
        n = len(_teacher_input(item)) if is_good else 0
        cost = max(longest, n) * (good + is_good) if padded else total + n
        if batch and (cost > batch_tokens or len(batch) >= max_rows):
            yield batch
            batch, longest, good, total = [], 0, 0, 0
        batch.append((index, item))
        longest = max(longest, n)
        good += is_good
        total += n
    if batch:
        yield batch


def _interrupted(cfg: GenerateConfig, opened: bool) -> Interrupted:
    """What an interrupted run kept: the manifest on disk (not the writer's memory, which may list a shard
    whose manifest write the interrupt cut short)."""
    out = as_path(cfg.out)
    try:
        manifest = read_manifest(out) if opened else None
    except CacheFormatError:
        manifest = None  # a new folder with nothing committed was removed
    if manifest is None or not manifest.shards:
        if not opened:
            return Interrupted(f"stopped before {out} was opened; nothing was written by this run; rerun the same command to start")
        every = (f"every {cfg.commit_seconds:g} s of teacher work" if cfg.commit_seconds is not None
                 else f"every {cfg.shard_tokens} tokens (commit_seconds is off)")
        return Interrupted(
            f"nothing was committed yet (a shard commits {every}: --set commit_seconds=...); rerun the same command to start over"
        )
    n = manifest.shards[-1].input_rows_end
    return Interrupted(
        f"kept {plural(len(manifest.shards), 'shard')} ({plural(manifest.num_rows, 'row')}, "
        f"{plural(manifest.num_tokens, 'token')}, input rows 0-{n - 1}) in {out}; rerun the same command to resume"
    )


def generate(cfg: GenerateConfig, progress: bool = True, teacher: Teacher | None = None) -> Manifest:
    """Run the teacher over ``cfg.data`` into the cache at ``cfg.out``; resumes an interrupted run.

    ``teacher``: an already built (possibly loaded) teacher to reuse across several caches; it must
    match ``cfg`` and stays open. By default the teacher is built from ``cfg`` and closed at the end.
    A KeyboardInterrupt is raised as :class:`Interrupted` saying what the cache kept.
    """
    cfg.validate()
    cfg = part_config(cfg)  # a part of a job array goes into its folder of cfg.out
    opened: list[CacheWriter] = []  # the writer, once the cache is open
    try:
        return _generate(cfg, progress, teacher, opened)
    except KeyboardInterrupt:
        raise _interrupted(cfg, opened=bool(opened)) from None


def _generate(cfg: GenerateConfig, progress: bool, teacher: Teacher | None, opened: list[CacheWriter]) -> Manifest:
    # Open the dataset and check its fields before the teacher loads (seconds) and before anything is on disk.
    rows = iter_rows(cfg.data)
    first = next(rows, None)
    if first is None:
        if cfg.data.where:
            raise DataError(f"no row of {cfg.data.source!r} matches data.where {cfg.data.where}; fix the field values or drop data.where")
        raise DataError(f"dataset {cfg.data.source!r} is empty (no rows in split {cfg.data.split!r})")
    fmt = resolve_format(cfg.data, first, prompts_only=_continues_every_row(cfg))
    if cfg.generation.enabled and cfg.generation.rows == "unanswered" and fmt != "prompt_response":
        raise ConfigError(f"generation.rows=unanswered continues the rows whose response is empty, but the rows are {fmt}; "
                          "use prompt/response rows (--set data.format=prompt_response) or generation.rows=all")
    if cfg.context:
        check_template(cfg.context, first, student_fields(cfg.data, fmt))
    kept = kept_field_types(cfg.keep_fields, first)
    owned = teacher is None
    teacher = build_teacher(cfg) if owned else teacher
    try:
        return _write(cfg, progress, teacher, opened, first, rows, kept)
    finally:
        if owned:  # on every way out, a refusal before the writer opens included
            teacher.close()


def _write(cfg: GenerateConfig, progress: bool, teacher: Teacher, opened: list[CacheWriter], first: dict, rows,
           kept: dict[str, str]) -> Manifest:
    if cfg.top_k > teacher.vocab_size:
        raise ConfigError(f"top_k {cfg.top_k} is larger than the teacher's vocabulary ({teacher.vocab_size}); pass --top-k {teacher.vocab_size} or less")
    limit = teacher.max_sequence_length()
    if limit is not None and limit < cfg.data.max_length:
        log.warning("the %s engine takes at most %d tokens per sequence; rows longer than that are %s (data.truncation)",
                    cfg.backend, limit, "truncated" if cfg.data.truncation == "truncate" else "skipped and counted")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=limit))
    stored = _stored(cfg, teacher)
    layers = stored.layers
    for name in teacher.input_fields:
        if name not in first:
            raise ConfigError(f"the teacher reads field {name!r}, which the dataset does not have (it has {sorted(first)}); "
                              "pass the right field (e.g. --set media.field=NAME)")
    context = TeacherContext.build(cfg.context, teacher.tokenizer) if cfg.context else None
    signals = make_signals(
        cfg.top_k, teacher.vocab_size, cfg.logprob_codec, layers, teacher.hidden_size, cfg.hidden_codec, cfg.generation.enabled,
        sampled_draws=cfg.sampled_tokens, proposal_temperature=cfg.proposal_temperature, tail_temperatures=cfg.tail_temperatures,
        hidden_project_dim=cfg.hidden_project_dim, hidden_project_seed=cfg.hidden_project_seed,
        hidden_positions=cfg.hidden_positions, hidden_positions_seed=cfg.seed, attention=stored.attention,
        context=context.settings() if context is not None else None,
        pooled={"layers": stored.pooled, "pooling": stored.pooling, "size": teacher.hidden_size} if stored.pooled else None,
        fields=kept, classes=teacher.classes(), topk_codec=cfg.codec, topk_codec_options=cfg.codec_options,
    )
    teacher.attention_layers = tuple(stored.qkv_layers)
    tokenize = _row_tokenizer(cfg, teacher.tokenizer, first)

    out = as_path(cfg.out)
    writer = CacheWriter(
        out, _settings(cfg, teacher, layers, stored), signals, overwrite=cfg.overwrite, shard_tokens=cfg.shard_tokens,
        row_group_tokens=cfg.row_group_tokens, commit_seconds=cfg.commit_seconds, compression_level=cfg.compression_level,
        created_by="kdcache generate",
    )
    opened.append(writer)
    if writer.complete:
        log.info("cache %s is already complete (%d rows); nothing to do", out, writer.manifest.num_rows)
        return writer.manifest
    sink = BackgroundWriter(writer, cfg.write_queue)  # encoding, zstd and fsync in a thread: the teacher never waits
    try:
        _save_tokenizer(teacher.tokenizer, out)
        manifest = _run(cfg, teacher, stored, sink, first, rows, tokenize, progress, context, kept)
    except BaseException:
        # Nothing committed in a directory this run created: leave no half-made cache behind (under the lock).
        sink.abort(discard_new=True)
        raise
    return manifest


def _run(cfg, teacher: Teacher, stored: _Stored, writer: BackgroundWriter, first, rows, tokenize, progress,
         context: TeacherContext | None, kept: dict[str, str]) -> Manifest:
    start = writer.resume_input_row
    if start:
        log.info("resuming after input row %d", start)
    limit = teacher.max_sequence_length()
    mine = keeps(cfg)  # a part of a job array scores its own rows; example ids stay the global row index

    def tokenized() -> Iterator[tuple[int, Tokenized | BadRow]]:
        for index, row in enumerate(itertools.chain([first], rows)):
            if index < start or not mine(index):
                continue
            item = tokenize(row)
            if context is not None and isinstance(item, Tokenized):
                item = _with_context(item, context, row, limit)
            if kept and isinstance(item, Tokenized):
                values = {name: field_value(row, name, kind) for name, kind in kept.items()}
                bad = [name for name, v in values.items() if v is None]
                item = BadRow("wrong_field_type", f"kept field {bad[0]!r} is missing or not {kept[bad[0]]}") if bad else \
                    dataclasses.replace(item, fields=values)
            if teacher.input_fields and isinstance(item, Tokenized):  # what a non-text teacher reads (an image path)
                absent = [f for f in teacher.input_fields if row.get(f) is None]
                item = BadRow("missing_teacher_input", f"field {absent[0]!r}, which the teacher reads, is missing") if absent else \
                    dataclasses.replace(item, teacher_input={f: row[f] for f in teacher.input_fields})
            if isinstance(item, BadRow):
                if cfg.data.strict:
                    raise DataError(f"bad row {index}: {item.detail} (reason {item.reason}); fix the row or drop --strict to skip and count it")
            yield index, item

    # Requests go to the teacher lazily and results come back in order, so an engine may keep several
    # batches in flight while the writer commits earlier ones. A batch is one request, or two when it mixes
    # rows the teacher continues with rows it scores as they are (generation.rows=unanswered); `pending`
    # holds each batch with its parts and the results that came back for them so far.
    pending: deque[tuple[list, list[tuple[str, list]], list]] = deque()  # (batch, [(kind, rows)], results)

    def requests() -> Iterator[Request]:
        for batch in _batches(tokenized(), cfg.batch_tokens, padded=teacher.pads_batches):
            good = [(i, t) for i, t in batch if isinstance(t, Tokenized)]
            continued = [(i, t, _prompt(t, cfg.generation.prompt_tokens)) for i, t in good if t.generate]
            fits = [(i, t, p) for i, t, p in continued if len(p) < cfg.data.max_length]  # room for at least one new token
            scored = [(i, t) for i, t in good if not t.generate]
            parts = ([("generate", fits)] if continued else []) + ([("score", scored)] if scored or not continued else [])
            pending.append((batch, parts, []))
            for kind, items in parts:
                if kind == "generate":
                    yield _generate_request(cfg, items, limit)
                else:
                    yield ScoreRequest([_teacher_input(t) for _, t in items], seeds=[_row_seed(cfg.seed, i) for i, _ in items],
                                       inputs=[t.teacher_input for _, t in items] if teacher.input_fields else None)

    teacher.progress = progress
    teacher.load()
    bar = tqdm(total=cfg.data.max_rows, initial=start, unit="row", desc="generate", disable=not progress)
    tokens = 0
    sampling = SparseSampling(cfg.sampled_tokens, cfg.proposal_temperature) if cfg.sampled_tokens else None
    for result in teacher.run(requests(), cfg.top_k, stored.captured, sampling):
        batch, parts, results = pending[0]
        results.append(result)
        if len(results) < len(parts):
            continue
        pending.popleft()
        examples = {}
        for (kind, items), res in zip(parts, results):
            examples.update(_generated_examples(cfg, items, res, stored) if kind == "generate" else _scored_examples(cfg, items, res, stored))
        for i, item in batch:
            if isinstance(item, BadRow):
                writer.count(f"bad_rows.{item.reason}")
            else:
                if item.truncated:
                    writer.count("truncated_rows")
                if i not in examples:
                    writer.count("bad_rows.no_room_to_generate")
            exs = examples.get(i, [])
            tokens += sum(len(e["input_ids"]) for e in exs)
            writer.add_row(exs, i + 1)
        bar.update(len(batch))
        bar.set_postfix(tokens=tokens)
    bar.close()
    reasons = {k: v for k, v in writer.stats.items() if k.startswith("bad_rows")}
    if writer.rows_added == 0 and not writer.manifest.shards and (reasons or not is_part(cfg)):  # a part may hold no row
        raise DataError(f"no usable rows in {cfg.data.source!r}: every row was bad ({reasons}); check --field and the data")
    manifest = writer.close()
    bad = {k: v for k, v in manifest.stats.items() if k.startswith("bad_rows")}
    if bad:
        log.warning("skipped bad rows: %s", ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in sorted(bad.items())))
    truncated = manifest.stats.get("truncated_rows", 0)
    if truncated:
        total = manifest.shards[-1].input_rows_end if manifest.shards else truncated
        were = "was" if truncated == 1 else "were"
        log.warning("%s of %s %s longer than max_length %d and %s truncated; raise --max-length to keep them",
                    f"{truncated:,}", plural(total, "row"), were, cfg.data.max_length, were)
    return manifest


def _with_context(item: Tokenized, context: TeacherContext, row: dict, limit: int | None) -> Tokenized | BadRow:
    ids = context.ids(row)
    if ids is None:
        return BadRow("missing_context_field", f"a field the context reads ({', '.join(context.fields)}) is missing or not text")
    seq, offset = teacher_sequence(ids, item.input_ids, getattr(context.tokenizer, "bos_token_id", None))
    if limit is not None and len(seq) > limit:
        return BadRow("context_too_long", f"context + row is {len(seq)} tokens > the engine's {limit}")
    return dataclasses.replace(item, teacher_ids=seq, context_tokens=offset)


def _teacher_input(t: Tokenized) -> np.ndarray:
    """What the teacher scores for a row: its tokens, or the context's and its own."""
    return t.input_ids if t.teacher_ids is None else t.teacher_ids


def _prompt(t: Tokenized, prompt_tokens: int) -> np.ndarray:
    """What the teacher continues: the row's own prompt, else the start of its text."""
    if t.prompt is not None and len(t.prompt):
        return t.prompt
    return t.input_ids[:prompt_tokens] if prompt_tokens else t.input_ids


def _row_seed(seed: int, row: int) -> int:
    return (seed * 1_000_003 + row) % 2**63


def _generate_request(cfg: GenerateConfig, items: list, limit: int | None) -> GenerateRequest:
    """The teacher continues each row's prompt after its context (if any); the request's length cap leaves room
    for the longest context, and each row is cut back to data.max_length once its continuation is known."""
    longest_context = max((t.context_tokens for _, t, _ in items), default=0)
    max_length = cfg.data.max_length + longest_context
    if limit is not None:
        max_length = min(max_length, limit)
    seeds = [_row_seed(cfg.seed, i) if cfg.generation.do_sample else cfg.seed for i, _, _ in items]
    return GenerateRequest([_teacher_prompt(t, p) for _, t, p in items], seeds, cfg.generation, max_length)


def _teacher_prompt(t: Tokenized, prompt: np.ndarray) -> np.ndarray:
    """The student's prompt as the teacher reads it: after the context, when there is one."""
    return prompt if t.teacher_ids is None else t.teacher_ids[: t.context_tokens + len(prompt)]


def _scored_examples(cfg: GenerateConfig, items: list, result: list, stored: _Stored) -> dict[int, list[dict]]:
    """Cache examples of rows the teacher scored as they are."""
    examples: dict[int, list[dict]] = {}
    for (i, t), s in zip(items, result):
        if t.teacher_ids is None:
            ex = _example(str(i), t.input_ids, t.loss_mask, s, stored)
        else:
            ex = _example(str(i), t.input_ids, t.loss_mask, align(s, t.context_tokens, len(t.input_ids)), stored)
            ex[CONTEXT_COLUMN] = t.context_tokens
        if cfg.generation.enabled:  # a given response in a cache of continuations (generation.rows=unanswered)
            ex["prompt_length"] = len(t.prompt) if t.prompt is not None else 0
            ex["sample_index"] = 0
        examples[i] = [{**ex, **(t.fields or {})}]
    return examples


def _generated_examples(cfg: GenerateConfig, items: list, result: list, stored: _Stored) -> dict[int, list[dict]]:
    """Cache examples of continued rows: the student's prompt + the teacher's continuation, cut to data.max_length,
    with the teacher's scores at those tokens (aligned past the context). Rows missing from the result had no room
    to generate."""
    examples: dict[int, list[dict]] = {}
    for (i, t, prompt), samples in zip(items, result):
        exs = examples.setdefault(i, [])
        plen, start = len(prompt), len(_teacher_prompt(t, prompt))
        for j, (seq, s) in enumerate(samples):
            tokens = np.concatenate([prompt, seq[start:]]).astype(np.int32)[: cfg.data.max_length]
            if len(tokens) <= plen:
                continue  # cut away by max_length together with the context
            mask = np.zeros(len(tokens) - 1, dtype=bool)
            mask[plen - 1 :] = True
            if t.teacher_ids is not None:
                s = align(s, t.context_tokens, len(tokens), longer=True)
            ex = _example(f"{i}#g{j}", tokens, mask, s, stored)
            if t.teacher_ids is not None:
                ex[CONTEXT_COLUMN] = t.context_tokens
            ex["prompt_length"] = plen
            ex["sample_index"] = j
            exs.append({**ex, **(t.fields or {})})
    return examples


def _example(example_id: str, input_ids: np.ndarray, loss_mask: np.ndarray, s: dict, stored: _Stored) -> dict:
    m = loss_mask
    n = int(m.sum())
    ex = {
        "example_id": example_id,
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        **{name: s[name] for name in (*TOPK_COLUMNS, TEMPERED_TAIL_COLUMN, *SAMPLED_COLUMNS) if name in s},
        # a teacher without next-token scores (an encoder) has no NLL; its entropy is that of its classes, if any
        "teacher_nll": float(-s["target_logprob"][m].mean()) if n and "target_logprob" in s else float("nan"),
        "teacher_entropy": (float(s["entropy"][m].mean()) if n else float("nan")) if "entropy" in s else s.get("class_entropy", float("nan")),
        "num_loss_tokens": n,
    }
    positions = None
    if stored.layers and stored.positions != "all":
        positions = select_positions(stored.positions, len(input_ids), stored.seed, example_id)
        ex[HIDDEN_POSITIONS_COLUMN] = positions
    for layer in stored.layers:
        h = s[f"hidden_{layer}"]
        if positions is not None:
            h = h[positions]
        ex[f"hidden_{layer}"] = h @ stored.projection if stored.projection is not None else h
    for block in stored.qkv_layers:
        ex[f"qkv_{block}"] = s[f"qkv_{block}"]
    if CLASS_LOGITS_COLUMN in s:
        ex[CLASS_LOGITS_COLUMN] = s[CLASS_LOGITS_COLUMN]
    for layer in stored.pooled:
        h = s[f"hidden_{layer}"]
        ex[pooled_column(layer)] = (h.astype(np.float64).mean(axis=0) if stored.pooling == "mean" else h[-1]).astype(np.float32)
    return ex
