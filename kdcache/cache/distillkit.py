"""`kdcache import`: a DistillKit logit dataset read row group by row group and written as a kdcache cache.

The format itself (settings, bit packing, the decoder and a writer for tests) is kdcache/cache/distillkit_format.py;
this module streams the source files, splits packed rows, derives masks and statistics and writes through
CacheWriter, so an import resumes and a rerun on a complete cache does nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kdcache.cache.distillkit_format import (
    COLUMNS,
    ID_COLUMNS,
    MAX_LOGPROB,
    MAX_MASS,
    TAIL_FLOOR,
    DistillKitConfig,
    decode_ids,
    decode_logprobs,
    find_config_file,
    load_config,
    with_tail,
)
from kdcache.cache.manifest import Manifest
from kdcache.cache.schema import make_signals
from kdcache.cache.filesystem import is_remote
from kdcache.cache.writer import CacheWriter, install_tokenizer
from kdcache.config import show as _show
from kdcache.errors import ConfigError, DataError
from kdcache.fingerprint import tokenizer_fingerprint, tree_fingerprint

log = logging.getLogger(__name__)

__all__ = ["DistillKitConfig", "find_config_file", "import_distillkit", "load_config", "source_files"]


# ---------------------------------------------------------------------- reading DistillKit files
def _natural(path: Path) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def source_files(src: str | Path) -> list[Path]:
    """The Parquet files of SRC: the file itself, or every ``*.parquet`` under the folder in natural order
    (``data_2`` before ``data_10``, as DistillKit numbers them)."""
    if is_remote(src):
        raise ConfigError(f"kdcache import reads local files, not {src} (an object store); download the DistillKit files first")
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise DataError(f"{src} does not exist; pass a DistillKit Parquet file or a folder of them")
    files = sorted((p for p in src.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(src).parts)), key=_natural)
    if not files:
        raise DataError(f"{src} holds no .parquet files; pass a DistillKit Parquet file or a folder of them")
    return files


def _check_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in COLUMNS if c not in names]
    if not missing:
        return
    if {"packed_indices", "exact_values", "coeffs"} <= set(names):
        raise DataError(f"{path} is in DistillKit's legacy format (packed_indices, exact_values, coeffs), which kdcache import does not read")
    if {"token_ids", "top_values"} <= set(names):
        raise DataError(f"{path} holds uncompressed top-k columns (token_ids, top_values), not DistillKit's compressed format; "
                        "kdcache import reads compressed_logprobs + bytepacked_indices")
    raise DataError(f"{path} is not a DistillKit logit file: no {', '.join(missing)} column (it has {', '.join(names[:8])}); "
                    "kdcache import reads input_ids, compressed_logprobs and bytepacked_indices")


def _list_parts(arr: pa.Array) -> tuple[np.ndarray, Any]:
    """(offsets [n+1] into the child, child) of a list, large list or (large) binary array."""
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return np.asarray(arr.offsets, dtype=np.int64), arr.values
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        width = np.int32 if pa.types.is_binary(t) else np.int64
        offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
        return offsets, np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    raise DataError(f"expected a list column, got {t}")


def _leaf(values: Any, name: str, byte: bool) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    if values.null_count:
        raise DataError(f"column {name} holds null values inside its lists; every value must be set")
    out = values.to_numpy(zero_copy_only=False)
    if not np.issubdtype(out.dtype, np.integer):
        raise DataError(f"column {name} holds {values.type} values; expected integers")
    if byte and out.dtype != np.uint8:
        if out.size and (out.min() < 0 or out.max() > 255):
            raise DataError(f"column {name} holds values outside 0..255; expected bytes")
        out = out.astype(np.uint8)
    return out


def _ints(col: pa.Array, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list<int> column -> (offsets [n+1] starting at 0, values int64)."""
    offsets, child = _list_parts(col)
    values = _leaf(child, name, byte=False)[offsets[0] : offsets[-1]].astype(np.int64)
    return offsets - offsets[0], values


def _bytes(col: pa.Array, width: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """list<list<uint8>> (or list<binary>) -> (row offsets [n+1] from 0, [P, width] uint8, [P] bytes each position has)."""
    outer, child = _list_parts(col)
    inner, leaf = _list_parts(child)
    inner = inner[outer[0] : outer[-1] + 1]
    values = _leaf(leaf, name, byte=True)
    lengths = np.diff(inner)
    P = len(lengths)
    if (lengths == width).all() and (P == 0 or inner[-1] - inner[0] == P * width):
        matrix = values[inner[0] : inner[-1]].reshape(P, width)
    elif len(values):  # some positions of another length: gather each one's bytes (theirs are garbage, their rows bad)
        index = np.where(lengths == width, inner[:-1], 0)[:, None] + np.arange(width)
        matrix = values[np.clip(index, 0, len(values) - 1)]
    else:
        matrix = np.zeros((P, width), np.uint8)
    return outer - outer[0], matrix, lengths


REASONS = ("positions_mismatch", "wrong_bytes_per_position", "non_finite_logprobs", "not_a_distribution", "id_out_of_range",
           "token_out_of_range", "attention_mask_length", "labels_length", "too_short")


@dataclasses.dataclass
class _Batch:
    """One Parquet batch decoded at once: per-position arrays over all its rows."""

    tok_off: np.ndarray
    toks: np.ndarray
    pos_off: np.ndarray
    ids: np.ndarray  # [P, k] int64
    logprobs: np.ndarray  # [P, k] float64
    tail: np.ndarray  # [P]
    nll: np.ndarray  # [P] -log p(next token) (tail bucket when outside the top-k)
    entropy: np.ndarray  # [P] entropy of the k + 1 buckets
    reason: np.ndarray  # [rows] index into REASONS, -1: good
    detail: list[str]
    mask: tuple[np.ndarray, np.ndarray] | None
    labels: tuple[np.ndarray, np.ndarray] | None
    ids_col: list | None
    widths: tuple[np.ndarray, np.ndarray]  # bytes each position has (compressed_logprobs, bytepacked_indices)


def _decode_batch(batch: pa.RecordBatch, cfg: DistillKitConfig, vocab: int) -> _Batch:
    names = batch.schema.names
    n = batch.num_rows
    tok_off, toks = _ints(batch.column("input_ids"), "input_ids")
    lp_off, lp_bytes, lp_len = _bytes(batch.column("compressed_logprobs"), cfg.logprob_bytes, "compressed_logprobs")
    ix_off, ix_bytes, ix_len = _bytes(batch.column("bytepacked_indices"), cfg.index_bytes, "bytepacked_indices")
    T, P, Pi = np.diff(tok_off), np.diff(lp_off), np.diff(ix_off)
    reason = np.full(n, -1, dtype=np.int64)
    detail = [""] * n

    def mark(rows: np.ndarray, code: str, why) -> None:
        for r in np.flatnonzero(rows & (reason < 0)):
            reason[r] = REASONS.index(code)
            detail[r] = why(r)

    pos_row = np.repeat(np.arange(n), P)
    j = np.arange(len(pos_row)) - np.repeat(lp_off[:-1], P)  # position within its row

    def per_row(flag: np.ndarray) -> np.ndarray:
        return np.bincount(pos_row, weights=flag.astype(np.float64), minlength=n) > 0

    mark(P != Pi, "positions_mismatch", lambda r: f"{P[r]} compressed_logprobs positions but {Pi[r]} bytepacked_indices")
    ix_ok = ix_len == cfg.index_bytes
    if (P != Pi).any():  # line the index bytes up with the log-prob positions (the mismatched rows are bad anyway)
        at = np.repeat(ix_off[:-1], P) + np.minimum(j, np.maximum(np.repeat(Pi, P) - 1, 0))
        if len(ix_bytes):
            at = np.clip(at, 0, len(ix_bytes) - 1)
            ix_bytes, ix_ok = ix_bytes[at], ix_ok[at]
        else:
            ix_bytes, ix_ok = np.zeros((len(j), cfg.index_bytes), np.uint8), np.zeros(len(j), bool)
    mark(per_row((lp_len != cfg.logprob_bytes) | ~ix_ok), "wrong_bytes_per_position", lambda r: "a position's byte list has the wrong length")
    ids = decode_ids(cfg, ix_bytes)
    with np.errstate(all="ignore"):  # garbage in bad rows may overflow; those rows are marked and skipped
        raw = decode_logprobs(cfg, lp_bytes)
        finite = np.isfinite(raw).all(axis=1)
        mark(per_row(~finite), "non_finite_logprobs", lambda r: "decoded log-probabilities are not finite")
        raw = np.where(finite[:, None], raw, -30.0)
        e = np.exp(raw)
        mass = e.sum(axis=1)
        peak = raw.max(axis=1)
        mark(per_row((mass > MAX_MASS) | (peak > MAX_LOGPROB)), "not_a_distribution",
             lambda r: f"top-k mass {mass[pos_row == r].max():.3g} (at most {MAX_MASS} expected), highest log-prob {peak[pos_row == r].max():.3g}")
        mark(per_row((ids >= vocab).any(axis=1)), "id_out_of_range",
             lambda r: f"a top-k id is {ids[pos_row == r].max()}, not below the vocabulary size {vocab}")
        bad_tok = np.bincount(np.repeat(np.arange(n), T), weights=((toks < 0) | (toks >= vocab)).astype(np.float64), minlength=n) > 0
        mark(bad_tok, "token_out_of_range", lambda r: f"an input id lies outside [0, {vocab})")

        mask = _ints(batch.column("attention_mask"), "attention_mask") if "attention_mask" in names else None
        labels = _ints(batch.column("labels"), "labels") if "labels" in names else None
        segmented = np.zeros(n, dtype=bool)
        if mask is not None:
            m_off, m = mask
            mark(np.diff(m_off) != T, "attention_mask_length", lambda r: f"attention_mask has {np.diff(m_off)[r]} values for {T[r]} tokens")
            m_row = np.repeat(np.arange(n), np.diff(m_off))
            new = np.r_[True, (m[1:] != m[:-1]) | (m_row[1:] != m_row[:-1])] if len(m) else np.zeros(0, bool)
            segmented = np.bincount(m_row, weights=((m != 0) & new).astype(np.float64), minlength=n) > 1
        if labels is not None:
            mark(np.diff(labels[0]) != T, "labels_length", lambda r: f"labels has {np.diff(labels[0])[r]} values for {T[r]} tokens")
        mark(~((P == T) | ((P == T - 1) & ~segmented)), "positions_mismatch",
             lambda r: f"{P[r]} stored positions for {T[r]} tokens (expected {T[r] - 1}, or {T[r]} in a packed row)")
        mark(T < 2, "too_short", lambda r: f"{T[r]} token(s): nothing to predict")

        lp, p, tail = with_tail(raw, vocab, e)
        tail_p = np.exp(tail)
        entropy = -(p * lp).sum(axis=1) - np.where(tail_p > 0, tail_p * tail, 0.0)
        # the token each position predicts (past a row's end: garbage, never used)
        target = toks[np.clip(np.repeat(tok_off[:-1], P) + j + 1, 0, max(len(toks) - 1, 0))] if len(toks) else np.zeros(len(j), np.int64)
        hit = ids == target[:, None]
        lp_target = np.take_along_axis(lp, hit.argmax(axis=1)[:, None], 1)[:, 0]
        nll = np.where(hit.any(axis=1), -lp_target, -np.maximum(tail, np.log(TAIL_FLOOR)))
    id_col = next((c for c in ID_COLUMNS if c in names), None)
    return _Batch(tok_off, toks, lp_off, ids, lp, tail, nll, entropy, reason, detail, mask, labels,
                  batch.column(id_col).to_pylist() if id_col else None, (lp_len, ix_len))


def _segments(b: _Batch, r: int) -> list[tuple[int, int]]:
    """[start, end) token spans of row ``r``: runs of one nonzero attention_mask value, else the whole row."""
    T = int(b.tok_off[r + 1] - b.tok_off[r])
    if b.mask is None:
        return [(0, T)]
    m = b.mask[1][b.mask[0][r] : b.mask[0][r + 1]]
    bounds = np.r_[0, np.flatnonzero(np.diff(m) != 0) + 1, T]
    return [(int(a), int(e)) for a, e in zip(bounds[:-1], bounds[1:]) if m[a] != 0]


def _examples(b: _Batch, r: int, example_id: str) -> list[dict]:
    """Row ``r``'s examples: one per packed sequence (``ID#s<j>`` when there are several), at least 2 tokens each."""
    spans = _segments(b, r)
    t0, p0 = int(b.tok_off[r]), int(b.pos_off[r])
    out = []
    for j, (a, e) in enumerate(spans):
        if e - a < 2:
            continue
        g = slice(p0 + a, p0 + e - 1)  # stored position t predicts token t + 1: L tokens, L - 1 targets
        if b.labels is not None:
            mask = b.labels[1][b.labels[0][r] + a + 1 : b.labels[0][r] + e] >= 0
        else:
            mask = np.ones(e - a - 1, dtype=bool)
        n = int(mask.sum())
        out.append({
            "example_id": f"{example_id}#s{j}" if len(spans) > 1 else example_id,
            "input_ids": b.toks[t0 + a : t0 + e].astype(np.int32),
            "loss_mask": mask,
            "topk_ids": b.ids[g].astype(np.int32),
            "topk_logprobs": b.logprobs[g].astype(np.float32),
            "tail_logprob": b.tail[g].astype(np.float32),
            "teacher_nll": float(b.nll[g][mask].mean()) if n else float("nan"),
            "teacher_entropy": float(b.entropy[g][mask].mean()) if n else float("nan"),
            "num_loss_tokens": n,
        })
    return out


def _iter_batches(files: list[Path], start: int, max_rows: int | None, target_positions: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(global index of the batch's first row, batch) from ``start`` on, a bounded number of positions per batch."""
    row = 0
    for path in files:
        pf = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering reads ahead every requested row group: memory would grow with the file
        _check_columns(path, pf.schema_arrow.names)
        if max_rows is not None and row >= max_rows:
            return
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        ends = row + np.cumsum(sizes, dtype=np.int64)
        groups = [i for i in range(len(sizes)) if ends[i] > start]  # the groups holding rows at or after start
        if not groups:
            row = int(ends[-1]) if len(ends) else row
            continue
        row = int(ends[groups[0]] - sizes[groups[0]])
        skip = max(start - row, 0)
        first = pf.read_row_group(groups[0], columns=["input_ids"]).column(0)
        mean_tokens = max(1.0, float(np.mean(pc.list_value_length(first).to_numpy(zero_copy_only=False)))) if len(first) else 1.0
        batch_rows = int(max(1, min(4096, target_positions // mean_tokens)))
        columns = [c for c in pf.schema_arrow.names if c in (*COLUMNS, "attention_mask", "labels", *ID_COLUMNS)]
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
            if skip:
                cut = min(skip, batch.num_rows)
                batch, skip, row = batch.slice(cut), skip - cut, row + cut
                if batch.num_rows == 0:
                    continue
            if max_rows is not None:
                if row >= max_rows:
                    return
                batch = batch.slice(0, max_rows - row)
            yield row, batch
            row += batch.num_rows


def _tokenizer_record(tokenizer: Any, vocab: int) -> dict:
    if tokenizer is None:
        return {"fingerprint": None, "vocab_size": vocab}
    if len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the vocabulary is {vocab}; pass --vocab-size {len(tokenizer)} or more")
    return {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": vocab, "tokenizer_size": len(tokenizer),
            "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def import_distillkit(src: str | Path, out: str | Path, config: DistillKitConfig | Mapping[str, Any], *, vocab_size: int | None = None,
                      tokenizer: Any = None, teacher: str | None = None, logprob_codec: str = "fp16", max_rows: int | None = None,
                      strict: bool = False, overwrite: bool = False, progress: bool = False, shard_tokens: int = 4_000_000,
                      row_group_tokens: int = 16_384, commit_seconds: float | None = 60.0, batch_positions: int = 16_384) -> Manifest:
    """Write the DistillKit logit dataset ``src`` (a Parquet file or folder) as a kdcache cache at ``out``.

    ``config``: its compression settings (:class:`DistillKitConfig` or DistillKit's mapping). ``vocab_size``: the
    cache's vocabulary (default: ``config.d``; give the model's, e.g. 151,936 for Qwen3, when it is larger).
    ``tokenizer``: a loaded tokenizer (``save_pretrained``, ``get_vocab``) stored as the cache's, so students can
    be built from a spec and checked against it. ``teacher``: a name for the manifest. Rerunning with the same
    arguments resumes an interrupted import, or does nothing on a complete cache. ``batch_positions`` bounds
    the positions decoded at once (memory ~ 1 kB each at k = 128)."""
    cfg = config if isinstance(config, DistillKitConfig) else DistillKitConfig.from_mapping(config)
    vocab = int(vocab_size) if vocab_size is not None else cfg.d
    if vocab < 2:
        raise ConfigError(f"vocab_size {vocab} must be at least 2")
    if cfg.k > vocab:
        raise ConfigError(f"k ({cfg.k}) is larger than the vocabulary ({vocab}); pass --vocab-size {cfg.k} or more")
    if max_rows is not None and max_rows < 1:
        raise ConfigError(f"max_rows must be at least 1, got {max_rows}")
    if is_remote(out):
        raise ConfigError(f"kdcache import writes a local cache, not {out} (an object store); import into a local folder")
    src, out = Path(src), Path(out)
    files = source_files(src)
    resolved = src.resolve()
    if out.resolve() == resolved or resolved in out.resolve().parents:
        raise ConfigError(f"--out {out} lies inside the source {src}; choose an output folder outside it")
    optional = ("attention_mask", "labels", *ID_COLUMNS)
    names = pq.ParquetFile(files[0]).schema_arrow.names
    for path in files:
        these = pq.ParquetFile(path).schema_arrow.names
        _check_columns(path, these)
        if [c for c in optional if c in these] != [c for c in optional if c in names]:
            raise DataError(f"{path} and {files[0]} differ in their optional columns ({', '.join(optional)}); import them separately")
    id_col = next((c for c in ID_COLUMNS if c in names), None)
    settings = {
        "teacher": {"name": teacher or f"distillkit:{resolved.name}", "backend": "distillkit-import"},
        "tokenizer": _tokenizer_record(tokenizer, vocab),
        "dataset": {
            "source": str(resolved), "format": "distillkit", "files": len(files),
            # size + first/last MiB of each file (Parquet's footer, which records every column chunk's offset and
            # size, is in the last): published datasets run to hundreds of GB, hashed whole on every rerun otherwise
            "fingerprint": tree_fingerprint(resolved, (".parquet",), sampled=True), "fingerprint_kind": "sampled",
            **({"max_rows": max_rows} if max_rows is not None else {}),
        },
        "scoring": {
            "top_k": cfg.k, "logprob_codec": logprob_codec, "entropy": "topk_tail", "nll": "target_logprob_or_tail_bucket",
            "distillkit_compression": cfg.to_dict(),
            "alignment": "stored position t predicts input_ids[t+1]; a packed row's last position per sequence is dropped",
            "loss_mask": "labels[t+1] >= 0" if "labels" in names else "all",
            "segments": "attention_mask" if "attention_mask" in names else None,
            "example_id": id_col or "row_index",
        },
    }
    signals = make_signals(top_k=cfg.k, vocab_size=vocab, logprob_codec=logprob_codec)
    writer = CacheWriter(out, settings, signals, overwrite=overwrite, shard_tokens=shard_tokens, row_group_tokens=row_group_tokens,
                         commit_seconds=commit_seconds, created_by="kdcache import")
    if writer.complete:
        log.info("cache %s is already complete (%d rows); nothing to do", out, writer.manifest.num_rows)
        return writer.manifest
    try:
        if tokenizer is not None:
            install_tokenizer(out, tokenizer.save_pretrained)
        manifest = _import(files, cfg, vocab, writer, max_rows, strict, progress, batch_positions)
    except BaseException:
        # Nothing committed in a directory this run created: leave no half-made cache behind (as generate does).
        writer.abort(discard_new=True)
        raise
    return manifest


def _import(files: list[Path], cfg: DistillKitConfig, vocab: int, writer: CacheWriter, max_rows: int | None, strict: bool,
            progress: bool, batch_positions: int) -> Manifest:
    from tqdm.auto import tqdm

    start = writer.resume_input_row
    if start:
        log.info("resuming after input row %d", start)
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    total = min(total, max_rows) if max_rows is not None else total
    bar = tqdm(total=total, initial=start, unit="row", desc="import", disable=not progress)
    first_batch = True
    for first_row, batch in _iter_batches(files, start, max_rows, batch_positions):
        b = _decode_batch(batch, cfg, vocab)
        if first_batch:
            _check_layout(cfg, b)
            if (b.reason == REASONS.index("not_a_distribution")).all():
                raise ConfigError(
                    f"the decoded log-probabilities of the first {batch.num_rows} rows are not distributions ({b.detail[0]}): the "
                    f"compression settings do not fit the data; check delta_encoding (now {_show(cfg.delta_encoding)}), exact_dtype, "
                    "polynomial_terms and normalize_t against the capture's compression_config.yaml")
            first_batch = False
        for r in range(batch.num_rows):
            index = first_row + r
            examples: list[dict] = []
            if b.reason[r] >= 0:
                reason = REASONS[b.reason[r]]
                if strict:
                    raise DataError(f"bad row {index}: {b.detail[r]} (reason {reason}); fix the row or drop --strict to skip and count it")
                writer.count(f"bad_rows.{reason}")
            else:
                examples = _examples(b, r, str(b.ids_col[r]) if b.ids_col is not None else str(index))
                if not examples:
                    writer.count("bad_rows.too_short")
            writer.add_row(examples, index + 1)
        bar.update(batch.num_rows)
    bar.close()
    if writer.rows_added == 0 and not writer.manifest.shards:
        reasons = {k.split(".", 1)[1]: v for k, v in writer.stats.items() if k.startswith("bad_rows")}
        raise DataError(f"no usable rows in {files[0].parent if len(files) > 1 else files[0]}: every row was bad ({reasons}); "
                        "check the compression settings and the data")
    manifest = writer.close()
    bad = {k: v for k, v in manifest.stats.items() if k.startswith("bad_rows")}
    if bad:
        log.warning("skipped bad rows: %s", ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in sorted(bad.items())))
    return manifest


def _check_layout(cfg: DistillKitConfig, b: _Batch) -> None:
    """The byte lists of the first batch against the settings' layout: a mismatch in every position is a
    wrong setting (one line naming the sizes), not a bad row."""
    lp_widths, ix_widths = b.widths
    for widths, want, name, hint in (
        (lp_widths, cfg.logprob_bytes, "compressed_logprobs", f"these settings give {cfg.logprob_bytes} ({cfg.describe_layout()}); check exact_k, "
                                                               "exact_dtype, polynomial_terms, term_dtype and residual_bins"),
        (ix_widths, cfg.index_bytes, "bytepacked_indices", f"k={cfg.k} ids of {cfg.index_bits} bits (d={cfg.d}) take {cfg.index_bytes}; check k and d"),
    ):
        if len(widths) and not (widths == want).any():
            seen = np.bincount(widths).argmax()
            raise ConfigError(f"{name} holds {seen} bytes per position but {hint}")
