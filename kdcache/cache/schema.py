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
hidden_<L>         list<codec> [T*H]          (optional) hidden state after layer L, row-major
prompt_length      int32                      (generation) tokens of the prompt before the continuation
sample_index       int32                      (generation) which of the n samples for the prompt
=================  =========================  ======================================================

Flattened 2-D columns keep reads fast (one contiguous buffer per row group); the manifest gives k and H.
Top-k columns are absent when k = 0 (a sampled-only cache); sampled columns only when draws > 0.
"""

from __future__ import annotations

import pyarrow as pa

from kdcache.cache.codecs import get_codec
from kdcache.cache.manifest import FORMAT_VERSION

BASE_COLUMNS = ("example_id", "input_ids", "loss_mask")
TOPK_COLUMNS = ("topk_ids", "topk_logprobs", "tail_logprob")
TEMPERED_TAIL_COLUMN = "tail_logprob_tempered"
SAMPLED_COLUMNS = ("sampled_ids", "sampled_weights", "sampled_sizes")
STATS_COLUMNS = ("teacher_nll", "teacher_entropy", "num_loss_tokens")
GENERATION_COLUMNS = ("prompt_length", "sample_index")


def hidden_column(layer: int) -> str:
    return f"hidden_{layer}"


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
) -> dict:
    """The manifest's description of what a cache stores, with shapes, dtypes and codecs."""
    lp = get_codec(logprob_codec)
    signals: dict = {"stats": {"columns": {c: {"shape": [], "dtype": "int32" if c == "num_loss_tokens" else "float32"} for c in STATS_COLUMNS}}}
    if top_k:
        signals["topk"] = {
            "k": top_k,
            "vocab_size": vocab_size,
            "columns": {
                "topk_ids": {"shape": ["T-1", top_k], "dtype": "int32", "codec": "plain"},
                "topk_logprobs": {"shape": ["T-1", top_k], "dtype": str(lp.arrow_type), "codec": lp.name},
                "tail_logprob": {"shape": ["T-1"], "dtype": "float32", "codec": "plain"},
            },
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
        hc = get_codec(hidden_codec)
        signals["hidden"] = {
            "layers": list(hidden_layers),
            "size": hidden_size,
            "columns": {
                hidden_column(layer): {"shape": ["T", hidden_size], "dtype": str(hc.arrow_type), "codec": hc.name}
                for layer in hidden_layers
            },
        }
    if generation:
        signals["generation"] = {"columns": {c: {"shape": [], "dtype": "int32"} for c in GENERATION_COLUMNS}}
    return signals


def build_schema(signals: dict) -> pa.Schema:
    fields = [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
    ]
    if "topk" in signals:
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
    hidden = signals.get("hidden")
    if hidden:
        for name, col in hidden["columns"].items():
            fields.append(pa.field(name, pa.list_(get_codec(col["codec"]).arrow_type), nullable=False))
    if "generation" in signals:
        fields += [pa.field(c, pa.int32(), nullable=False) for c in GENERATION_COLUMNS]
    return pa.schema(fields, metadata={b"kdcache.format_version": str(FORMAT_VERSION).encode()})


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
