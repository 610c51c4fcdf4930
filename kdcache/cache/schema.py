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
"""

from __future__ import annotations

import pyarrow as pa

from kdcache.cache.codecs import get_codec
from kdcache.cache.hidden import parse_positions
from kdcache.cache.topk_storage import LOGICAL as TOPK_LOGICAL, get_storage, storage_of

BASE_COLUMNS = ("example_id", "input_ids", "loss_mask")
TOPK_COLUMNS = ("topk_ids", "topk_logprobs", "tail_logprob")
TEMPERED_TAIL_COLUMN = "tail_logprob_tempered"
SAMPLED_COLUMNS = ("sampled_ids", "sampled_weights", "sampled_sizes")
STATS_COLUMNS = ("teacher_nll", "teacher_entropy", "num_loss_tokens")
GENERATION_COLUMNS = ("prompt_length", "sample_index")
CONTEXT_COLUMN = "context_tokens"
CLASS_LOGITS_COLUMN = "class_logits"
#: Arrow types of kept dataset fields, by the Python type of the first row's value (bool before int: a bool is an int).
FIELD_TYPES = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string()}


def pooled_column(layer: int) -> str:
    return f"pooled_{layer}"


HIDDEN_POSITIONS_COLUMN = "hidden_positions"


def hidden_column(layer: int) -> str:
    return f"hidden_{layer}"


def qkv_column(layer: int) -> str:
    return f"qkv_{layer}"


def _coded_columns(name: str, rows: str, width: int, codec: str) -> dict:
    """A [rows, width] float column through ``codec``; a scaled codec adds its ``<name>_scale`` column after it."""
    c = get_codec(codec)
    cols = {name: {"shape": [rows, width], "dtype": str(c.arrow_type), "codec": c.name}}
    if c.scaled:
        # One binary blob per example: Parquet has no 8-bit physical type and stores list<int8> as INT32
        # (zstd then leaves ~1.4 bytes per value at D = 192); the blob is exactly one byte per value.
        cols[name]["layout"] = "binary"
        cols[name]["scale_column"] = f"{name}_scale"
        cols[f"{name}_scale"] = {"shape": [rows], "dtype": "float32", "codec": "plain", "scale_of": name}
    return cols


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
    """The manifest's description of what a cache stores, with shapes, dtypes and codecs.

    ``attention``: the qkv signal, ``{"layers", "sizes": [dq, dk, dv], "num_heads", "num_kv_heads", "head_dim"}``
    (None: not stored). ``context``: the teacher-only context's settings (template, alignment), None without one.
    ``pooled``: ``{"layers", "pooling", "size"}`` of example-level embeddings; ``fields``: kept dataset field -> its
    type name in FIELD_TYPES.
    Keys describing the hidden projection and positions appear only when they are not the
    defaults (full width, all positions), so a cache without them has the same signals as before they existed."""
    lp = get_codec(logprob_codec)
    signals: dict = {"stats": {"columns": {c: {"shape": [], "dtype": "int32" if c == "num_loss_tokens" else "float32"} for c in STATS_COLUMNS}}}
    if top_k:
        storage = get_storage(topk_codec)
        params = storage.params(top_k, vocab_size, topk_codec_options or {})
        signals["topk"] = {
            "k": top_k,
            "vocab_size": vocab_size,
            # (absent: lists, so a cache made before storages existed has the same signals)
            **({"storage": {"name": storage.name, "params": params, "logical_columns": list(TOPK_LOGICAL)}}
               if storage.name != "lists" else {}),
            "columns": storage.columns(top_k, params, lp),
            # How a trainer gets the teacher's tail bucket at temperature T != 1: exactly from the stored column
            # for these T, else by tempering the k+1 buckets (tail treated as one token on both sides).
            "tail_temperatures": [float(t) for t in tail_temperatures],
            "tail_at_other_temperatures": "bucket_tempered",
        }
        if tail_temperatures:
            signals["topk"]["columns"][TEMPERED_TAIL_COLUMN] = {"shape": ["T-1", len(tail_temperatures)], "dtype": "float32", "codec": "plain"}
    if sampled_draws:
        signals["sampled"] = {
            "draws": sampled_draws,
            "proposal_temperature": proposal_temperature,
            "vocab_size": vocab_size,
            "columns": {
                "sampled_ids": {"shape": ["sum(sizes)"], "dtype": "int32", "codec": "plain"},
                "sampled_weights": {"shape": ["sum(sizes)"], "dtype": str(lp.arrow_type), "codec": lp.name},
                "sampled_sizes": {"shape": ["T-1"], "dtype": "uint16", "codec": "plain"},
            },
        }
    if hidden_layers:
        kind, _ = parse_positions(hidden_positions)
        width = hidden_project_dim or hidden_size
        rows = "T" if kind == "all" else "P"
        columns: dict = {}
        if kind != "all":
            columns[HIDDEN_POSITIONS_COLUMN] = {"shape": ["P"], "dtype": "int32", "codec": "plain"}
        for layer in hidden_layers:
            columns.update(_coded_columns(hidden_column(layer), rows, width, hidden_codec))
        signals["hidden"] = {"layers": list(hidden_layers), "size": width}
        if hidden_project_dim:
            signals["hidden"].update(
                width=hidden_size, project_dim=hidden_project_dim, project_seed=hidden_project_seed,
                projection="h @ P, P = kdcache.cache.hidden.orthogonal_projection(width, project_dim, project_seed)",
            )
        if kind != "all":
            signals["hidden"]["positions"] = hidden_positions
            if kind == "fraction":
                signals["hidden"]["positions_seed"] = hidden_positions_seed
        signals["hidden"]["columns"] = columns
    if attention:
        sizes = [int(x) for x in attention["sizes"]]
        columns = {}
        for layer in attention["layers"]:
            columns.update(_coded_columns(qkv_column(layer), "T", sum(sizes), hidden_codec))
        signals["qkv"] = {
            "layers": list(attention["layers"]), "sizes": sizes, "num_heads": int(attention["num_heads"]),
            "num_kv_heads": int(attention["num_kv_heads"]), "head_dim": int(attention["head_dim"]),
            "tensor": "pre-RoPE q/k/v projections of block L (outputs of self_attn.q_proj, k_proj, v_proj), "
                      "concatenated q|k|v per token",
            "columns": columns,
        }
    if generation:
        signals["generation"] = {"columns": {c: {"shape": [], "dtype": "int32"} for c in GENERATION_COLUMNS}}
    if context:
        signals["context"] = {**context, "columns": {CONTEXT_COLUMN: {"shape": [], "dtype": "int32"}}}
    if pooled:
        signals["pooled"] = {
            "layers": list(pooled["layers"]), "pooling": pooled["pooling"], "size": int(pooled["size"]),
            "tensor": f"hidden_states[L] ({pooled['pooling']} over the row's tokens), float32",
            "columns": {pooled_column(layer): {"shape": [int(pooled["size"])], "dtype": "float32", "codec": "plain"} for layer in pooled["layers"]},
        }
    if classes:
        signals["classes"] = {"labels": list(classes), "columns": {CLASS_LOGITS_COLUMN: {"shape": [len(classes)], "dtype": "float32", "codec": "plain"}}}
    if fields:
        signals["fields"] = {"columns": {name: {"shape": [], "dtype": kind} for name, kind in fields.items()}}
    return signals


def build_schema(signals: dict) -> pa.Schema:
    fields = [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
    ]
    if "topk" in signals and storage_of(signals)[0].name != "lists":
        fields += [pa.field(name, pa.binary(), nullable=False) for name in signals["topk"]["columns"] if name != TEMPERED_TAIL_COLUMN]
        if TEMPERED_TAIL_COLUMN in signals["topk"]["columns"]:
            fields.append(pa.field(TEMPERED_TAIL_COLUMN, pa.list_(pa.float32()), nullable=False))
    elif "topk" in signals:
        lp = get_codec(signals["topk"]["columns"]["topk_logprobs"]["codec"])
        fields += [
            pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_logprobs", pa.list_(lp.arrow_type), nullable=False),
            pa.field("tail_logprob", pa.list_(pa.float32()), nullable=False),
        ]
        if TEMPERED_TAIL_COLUMN in signals["topk"]["columns"]:
            fields.append(pa.field(TEMPERED_TAIL_COLUMN, pa.list_(pa.float32()), nullable=False))
    if "sampled" in signals:
        w = get_codec(signals["sampled"]["columns"]["sampled_weights"]["codec"])
        fields += [
            pa.field("sampled_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("sampled_weights", pa.list_(w.arrow_type), nullable=False),
            pa.field("sampled_sizes", pa.list_(pa.uint16()), nullable=False),
        ]
    fields += [
        pa.field("teacher_nll", pa.float32(), nullable=False),
        pa.field("teacher_entropy", pa.float32(), nullable=False),
        pa.field("num_loss_tokens", pa.int32(), nullable=False),
    ]
    for sig in ("hidden", "qkv"):
        for name, col in (signals.get(sig) or {}).get("columns", {}).items():
            if col.get("layout") == "binary":
                fields.append(pa.field(name, pa.binary(), nullable=False))
                continue
            value_type = pa.type_for_alias(col["dtype"]) if col["codec"] == "plain" else get_codec(col["codec"]).arrow_type
            fields.append(pa.field(name, pa.list_(value_type), nullable=False))
    if "generation" in signals:
        fields += [pa.field(c, pa.int32(), nullable=False) for c in GENERATION_COLUMNS]
    if "context" in signals:
        fields.append(pa.field(CONTEXT_COLUMN, pa.int32(), nullable=False))
    for name in (signals.get("pooled") or {}).get("columns", {}):
        fields.append(pa.field(name, pa.list_(pa.float32()), nullable=False))
    if "classes" in signals:
        fields.append(pa.field(CLASS_LOGITS_COLUMN, pa.list_(pa.float32()), nullable=False))
    for name, col in (signals.get("fields") or {}).get("columns", {}).items():
        fields.append(pa.field(name, FIELD_TYPES[col["dtype"]], nullable=False))
    return pa.schema(fields, metadata={b"kdcache.format_version": str(format_version(signals)).encode()})


def format_version(signals: dict) -> int:
    """The cache format a cache with these signals is written in: its top-k storage's (1 without a top-k)."""
    return storage_of(signals)[0].format_version if "topk" in signals else 1


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
