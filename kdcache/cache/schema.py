"""The Parquet schema of a cache, built explicitly from the manifest's ``signals``.

Row layout (T = number of tokens, k = top-k, H = hidden size). Row t of every per-target column is the
teacher's distribution for predicting ``input_ids[t+1]`` from ``input_ids[:t+1]``:

=================  =========================  ======================================================
column             Parquet type               meaning
=================  =========================  ======================================================
example_id         string                     stable id: dataset row index (and ``#g<j>`` for samples)
input_ids          list<int32> [T]            tokens
loss_mask          list<bool> [T-1]           which next-token targets count (e.g. response-only)
topk_ids           list<int32> [(T-1)*k]      teacher top-k token ids, most likely first, row-major
topk_logprobs      list<codec> [(T-1)*k]      their log-probabilities at temperature 1
tail_logprob       list<float32> [T-1]        log of the probability mass outside the top-k
tail_logprob_tempered list<float32> [(T-1)*n]  (optional) log of that mass under softmax(logits / T_i), for the
                                              n temperatures in signals.topk.tail_temperatures (exact, from
                                              the full logits; absent: training tempers the k+1 buckets)
teacher_nll        float32                    mean teacher NLL over loss-mask targets
teacher_entropy    float32                    mean teacher entropy (full vocab) over loss-mask targets
num_loss_tokens    int32                      number of loss-mask targets
sampled_ids        list<int32> [sum sizes]    (RS-KD) unique tokens drawn from the teacher, per position
sampled_weights    list<codec> [sum sizes]    (RS-KD) their importance weights: count/N * p/q
sampled_sizes      list<uint16> [T-1]         (RS-KD) unique draws at each position
hidden_<L>         list<codec> [P*D]          (optional) hidden state after layer L, row-major: P = T stored
                                              positions (or those in hidden_positions), D = H (or the
                                              projected width signals.hidden.project_dim: h @ P, see hidden.py)
hidden_<L>_scale   list<float32> [P]          (codec int8) each stored token's scale: value = int8 * scale; with
                                              int8, hidden_<L> itself is binary: one blob of P*D int8 bytes
hidden_positions   list<int32> [P]            (positions other than all) the token positions stored, ascending
qkv_<L>            list<codec> [T*(dq+dk+dv)] (optional) block L's pre-RoPE q|k|v projections per token
qkv_<L>_scale      list<float32> [T]          (codec int8) each token's scale of qkv_<L>
prompt_length      int32                      (generation) tokens of the prompt before the continuation
sample_index       int32                      (generation) which of the n samples for the prompt
pooled_<L>         list<float32> [D]          (optional) one vector per example: hidden_states[L] pooled over the row's
                                              tokens (signals.pooled.pooling: mean or last), D = the teacher's width
class_logits       list<float32> [C]          (optional) a classifier teacher's logits per example, classes in
                                              signals.classes.labels order
<field>            string/int64/double/bool   (optional) dataset fields kept as they are (signals.fields), e.g. a label
context_tokens     int32                      (context) teacher tokens read before input_ids: row position t of
                                              every column above is teacher position context_tokens + t
=================  =========================  ======================================================

Flattened 2-D columns keep reads fast (one contiguous buffer per row group); the manifest gives k and H.
Top-k columns are absent when k = 0 (a sampled-only cache); sampled columns only when draws > 0.

Each signal is one module of kdcache/cache/signals/ (its manifest entry, columns, read layout and verify checks);
this module composes them: ``make_signals`` turns generate's settings into per-signal settings, ``build_schema`` asks
every signal of a manifest for its Arrow fields.
"""

from __future__ import annotations

import pyarrow as pa

from kdcache.cache.signals import build_signals, ordered
from kdcache.cache.signals.classes import CLASS_LOGITS_COLUMN
from kdcache.cache.signals.context import CONTEXT_COLUMN
from kdcache.cache.signals.fields import FIELD_TYPES
from kdcache.cache.signals.generation import GENERATION_COLUMNS
from kdcache.cache.signals.hidden import HIDDEN_POSITIONS_COLUMN, hidden_column
from kdcache.cache.signals.pooled import pooled_column
from kdcache.cache.signals.qkv import qkv_column
from kdcache.cache.signals.sampled import SAMPLED_COLUMNS
from kdcache.cache.signals.stats import STATS_COLUMNS
from kdcache.cache.signals.topk import TEMPERED_TAIL_COLUMN, TOPK_COLUMNS

BASE_COLUMNS = ("example_id", "input_ids", "loss_mask")

__all__ = ["BASE_COLUMNS", "CLASS_LOGITS_COLUMN", "CONTEXT_COLUMN", "FIELD_TYPES", "GENERATION_COLUMNS", "HIDDEN_POSITIONS_COLUMN",
           "SAMPLED_COLUMNS", "STATS_COLUMNS", "TEMPERED_TAIL_COLUMN", "TOPK_COLUMNS", "build_schema", "column_codecs",
           "format_version", "hidden_column", "list_columns", "make_signals", "pooled_column", "qkv_column", "scale_columns"]


def make_signals(
    top_k: int,
    vocab_size: int,
    logprob_codec: str = "fp16",
    hidden_layers: list[int] | None = None,
    hidden_size: int | None = None,
    hidden_codec: str = "fp16",
    generation: bool = False,
    sampled_draws: int = 0,
    proposal_temperature: float = 1.0,
    tail_temperatures: list[float] | tuple[float, ...] = (),
    hidden_project_dim: int = 0,
    hidden_project_seed: int = 0,
    hidden_positions: str = "all",
    hidden_positions_seed: int = 0,
    attention: dict | None = None,
    context: dict | None = None,
    pooled: dict | None = None,
    fields: dict[str, str] | None = None,
    classes: list[str] | None = None,
    topk_codec: str = "lists",
    topk_codec_options: dict | None = None,
) -> dict:
    """The manifest's description of what a cache stores, with shapes, dtypes and codecs: generate's settings as
    per-signal settings, each signal's module making its entry (kdcache/cache/signals/).

    ``attention``: the qkv signal, ``{"layers", "sizes": [dq, dk, dv], "num_heads", "num_kv_heads", "head_dim"}``
    (None: not stored). ``context``: the teacher-only context's settings (template, alignment), None without one.
    ``pooled``: ``{"layers", "pooling", "size"}`` of example-level embeddings; ``fields``: kept dataset field -> its
    type name in FIELD_TYPES.
    Keys describing the hidden projection and positions appear only when they are not the
    defaults (full width, all positions), so a cache without them has the same signals as before they existed."""
    settings: dict = {"stats": {}}
    if top_k:
        settings["topk"] = {"k": top_k, "vocab_size": vocab_size, "logprob_codec": logprob_codec, "codec": topk_codec,
                            "codec_options": topk_codec_options, "tail_temperatures": tail_temperatures}
    if sampled_draws:
        settings["sampled"] = {"draws": sampled_draws, "proposal_temperature": proposal_temperature,
                               "vocab_size": vocab_size, "logprob_codec": logprob_codec}
    if hidden_layers:
        settings["hidden"] = {"layers": hidden_layers, "size": hidden_size, "codec": hidden_codec,
                              "project_dim": hidden_project_dim, "project_seed": hidden_project_seed,
                              "positions": hidden_positions, "positions_seed": hidden_positions_seed}
    if attention:
        settings["qkv"] = {**attention, "codec": hidden_codec}
    if generation:
        settings["generation"] = {}
    if context:
        settings["context"] = context
    if pooled:
        settings["pooled"] = pooled
    if classes:
        settings["classes"] = {"labels": classes}
    if fields:
        settings["fields"] = {"fields": fields}
    return build_signals(settings)


def build_schema(signals: dict) -> pa.Schema:
    """The Parquet schema of a cache with these signals: the base columns, then each signal's fields in schema order.
    An unknown signal raises a one-line CacheFormatError naming it."""
    fields = [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
    ]
    for signal, entry in ordered(signals):
        fields += signal.arrow_fields(entry)
    return pa.schema(fields, metadata={b"kdcache.format_version": str(format_version(signals)).encode()})


def format_version(signals: dict) -> int:
    """The cache format a cache with these signals is written in: the highest its signals need (a top-k storage's)."""
    return max([1, *(signal.format_version(entry) for signal, entry in ordered(signals))])


def scale_columns(signals: dict) -> dict[str, str]:
    """Column -> its per-row scale column, for every column stored with a scaled codec (int8)."""
    return {name: col["scale_column"] for sig in signals.values() for name, col in sig.get("columns", {}).items()
            if "scale_column" in col}


def column_codecs(signals: dict) -> dict[str, str]:
    """Column name -> codec name, for every float column that goes through a codec."""
    out = {}
    for sig in signals.values():
        for name, col in sig.get("columns", {}).items():
            if col.get("codec") not in (None, "plain"):
                out[name] = col["codec"]
    return out


def list_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if pa.types.is_list(f.type)]
