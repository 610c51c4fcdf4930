"""The DistillKit logit-dataset format: its compression settings, bit packing, the decoder, and a writer for tests.

arcee-ai/DistillKit stores teacher top-k log-probabilities in Parquet with its own compression, and publishes
datasets in that format (Qwen3-235B, DeepSeek-V3/R1 teachers). This module reads that format with numpy and
pyarrow only and writes an ordinary kdcache cache through :class:`~kdcache.cache.writer.CacheWriter`, so it
streams (one Parquet batch at a time), resumes after an interruption and does nothing when rerun on a complete
cache. Written from DistillKit's own description and source (``distillkit/compression/config.py``,
``compressor.py``, ``monotonic_logprobs.py``, ``bitpack.py``; ``sample_logits_vllm.py``, ``sample_common.py`` and
``pack_logits.py`` for what the rows hold), not from its code.

The format
----------
Columns: ``input_ids`` list<int> [T]; ``compressed_logprobs`` and ``bytepacked_indices`` list<list<uint8>>,
one byte list per stored position, P positions. Optional: ``attention_mask`` (packed rows: one id per packed
sequence, 0 = padding), ``labels`` (-100: not a target), and here also ``example_id`` or ``id``.

What a position holds: the teacher's k most likely tokens at temperature 1, as log-probabilities (vLLM
``raw_logprobs``: log-softmax of the raw logits), sorted most likely first. Per position, for
:class:`DistillKitConfig` ``cfg``:

* **ids**: k ids of ``bits = ceil(log2 d)`` bits each (18 for d = 151,936 or 262,144), one big-endian bit
  stream, most significant bit first, zero-padded to ``ceil(k * bits / 8)`` bytes; in rank order.
* **log-probs**, in this byte order (every float little-endian, bfloat16 as the upper half of a float32):

  1. with ``delta_encoding`` the k values become ``v[0] = lp[0], v[i] = lp[i] - lp[i-1]`` (decoding is a
     cumulative sum); without, ``v = lp``;
  2. ``v[:exact_k]`` as ``exact_dtype``;
  3. with ``polynomial_terms`` (powers and "sqrt"/"exp" of ``t = 0, 1, ..., n-1``, or ``t`` evenly in
     [0, 1] with ``normalize_t``, where n = k - exact_k): the least-squares coefficients of
     ``v[exact_k:]`` as ``term_dtype``;
  4. per residual bin, for the next ``num_elements`` values of ``v[exact_k:]`` minus the fit (or of
     ``v[exact_k:]`` itself without terms): a scale as ``scale_dtype``, then each element as an unsigned
     ``element_bits`` code, bit-packed like the ids (to whole bytes per bin). Decoded as
     ``(code - 2^(b-1)) * scale``, or ``(2 code - 1) * scale`` for b = 1. Values no bin covers have a
     residual of 0.

Errors of the lossy parts (what the tests check against a float64 reference): exact values are rounded to
their dtype (relative 2^-24 float32, 2^-11 float16, 2^-8 bfloat16, and since sorted deltas all have one sign,
the cumulative sum keeps that bound: |error of lp[i]| <= u |lp[i]|); the fitted part is off by the fit's own
residual, or, inside a bin, by at most one quantisation step ``scale = max|residual| / 2^(b-1)``; with delta
encoding those errors add up along the ranks. Decoding here is in float64 from the stored numbers (DistillKit
evaluates the fit in ``term_dtype`` and, with delta encoding, rounds the result to ``exact_dtype``: its values
may differ from these by that rounding).

Alignment. DistillKit's capture drops vLLM's empty first prompt entry, so stored position t is the teacher's
distribution for token t + 1 given tokens 0..t: kdcache's own convention. A capture row has P = T - 1;
DistillKit's packing (``pack_logits``) first cuts ``input_ids`` to P tokens, so packed rows have P = T and
their last position (and the last of every packed sequence) predicts a token that is no longer there: those
positions are dropped. Any other P is a bad row (counted by reason, or an error with ``strict``). A row whose
``attention_mask`` holds several sequence ids is split into one example per sequence (``ID#s<j>``), as the
teacher saw each one alone.

Targets and statistics. ``loss_mask[t]`` is ``labels[t + 1] >= 0`` when the source has ``labels`` (the
Hugging Face convention its cross-entropy uses; DistillKit's own KD term masks position t by ``labels[t]``),
else all true. The tail is ``log(1 - sum p_topk)``, floored at log(1e-10) as for vLLM caches; -inf where the
decoded top-k hold all the mass (their sum reaches 1: the lossy parts may overshoot, and such a position's
log-probs are shifted to sum to exactly 1) or k >= vocab. ``teacher_nll`` is the mean over loss-mask targets
of -log p of the actual next token: its decoded log-prob when it is in the top-k, else the tail bucket's
log-mass (floored at log(1e-10)), so a lower bound of the teacher's true NLL; ``teacher_entropy`` is that of
the k + 1 buckets, a lower bound of the full-vocabulary entropy (recorded as ``topk_tail``).

Rows whose decoded values are not a distribution (a log-prob above 0.01, or a top-k mass above 1.5: fits overshoot
1 by a little on real data, and are renormalised, but delta-encoded data read without ``delta_encoding`` sums to
tens) are bad rows; when every row of the first batch is one, the settings do not fit the data and the import
stops. (The converse, plain data read with ``delta_encoding``, decodes to ever smaller log-probs, which no check
here can tell from a confident teacher: the settings must come from the capture.)
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.config import doc, show as _show
from kdcache.errors import ConfigError

#: dtype name -> (bytes, numpy little-endian dtype; None: bfloat16, handled by hand)
DTYPES: dict[str, tuple[int, str | None]] = {"float16": (2, "<f2"), "bfloat16": (2, None), "float32": (4, "<f4"), "float64": (8, "<f8")}
SPECIAL_TERMS = ("sqrt", "exp")
CONFIG_FILES = ("compression_config.yaml", "compression_config.yml", "compression_config.json")
"""What DistillKit's capture writes next to its Parquet files (``sample_logits_vllm --output``)."""
REQUIRED = ("d", "k", "exact_k", "residual_bins")
"""Keys DistillKit itself requires (its pydantic model has no default for them); the others default as there."""
_EXAMPLES = {"d": "151936", "k": "128", "exact_k": "16", "residual_bins": "[]"}
TAIL_FLOOR = 1e-10
COLUMNS = ("input_ids", "compressed_logprobs", "bytepacked_indices")
ID_COLUMNS = ("example_id", "id")
MAX_MASS = 1.5
MAX_LOGPROB = 0.01


@dataclasses.dataclass(frozen=True)
class ResidualBin:
    """One bin of quantised residuals (DistillKit's ``QuantizationBin``)."""

    scale_dtype: str = doc("dtype of the bin's scale: float16, bfloat16, float32 or float64.")
    element_bits: int = doc("Bits per element, 1 to 64.")
    num_elements: int = doc("Values of the fitted part (ranks exact_k, exact_k + 1, ...) this bin covers, in order.")

    @property
    def nbytes(self) -> int:
        return DTYPES[self.scale_dtype][0] + (self.num_elements * self.element_bits + 7) // 8


@dataclasses.dataclass(frozen=True)
class DistillKitConfig:
    """DistillKit's compression settings (its ``DistributionQuantizationConfig``, the ``logprob_compressor``
    section of a DistillKit training config, or the ``compression_config.yaml`` its capture writes). The same
    keys and defaults; a config DistillKit accepts is accepted here. Build from a mapping with
    :meth:`from_mapping` for one-line errors that name the key."""

    d: int = doc("Vocabulary size the ids were packed for: each id takes ceil(log2 d) bits (not necessarily the model's vocab).")
    k: int = doc("Log-probabilities stored per position (the top-k).")
    exact_k: int = doc("How many of them (the most likely) are stored as floats of exact_dtype.")
    residual_bins: tuple[ResidualBin, ...] = doc("Bins of quantised residuals after the fit ([] for none).")
    exact_dtype: str = doc("dtype of the exact values: float16, bfloat16, float32 or float64.", "float32")
    polynomial_terms: tuple[int | str, ...] | None = doc(
        "Terms fitted to the other k - exact_k values: integer powers of t and/or 'sqrt', 'exp' (null: no fit).", None)
    term_dtype: str = doc("dtype of the fitted coefficients.", "float32")
    delta_encoding: bool = doc("Values stored as differences from the previous rank (decoding sums them).", True)
    error_diffusion: bool = doc("Quantisation spread errors along the ranks when writing (the layout is the same; reading ignores it).", False)
    normalize_t: bool = doc("The fit's t runs evenly over [0, 1] instead of 0, 1, ..., n-1.", False)

    def __post_init__(self):
        def bad(key: str, value: Any, what: str) -> ConfigError:
            return ConfigError(f"DistillKit compression setting {key}={_show(value)} is invalid: {what} (fix it with --set {key}=... or in --config)")

        if self.d < 2:
            raise bad("d", self.d, "the vocabulary the ids were packed for has at least 2 tokens")
        if self.k < 1:
            raise bad("k", self.k, "at least one log-probability per position")
        if not 0 <= self.exact_k <= self.k:
            raise bad("exact_k", self.exact_k, f"between 0 and k ({self.k})")
        for key in ("exact_dtype", "term_dtype"):
            if getattr(self, key) not in DTYPES:
                raise bad(key, getattr(self, key), f"one of {', '.join(DTYPES)}")
        for term in self.polynomial_terms or ():
            if isinstance(term, str) and term not in SPECIAL_TERMS or isinstance(term, int) and term < 0:
                raise bad("polynomial_terms", list(self.polynomial_terms or ()), "integer powers >= 0 (a negative power is infinite at t = 0) or 'sqrt', 'exp'")
        for i, b in enumerate(self.residual_bins):
            if b.scale_dtype not in DTYPES:
                raise bad(f"residual_bins[{i}].scale_dtype", b.scale_dtype, f"one of {', '.join(DTYPES)}")
            if not 1 <= b.element_bits <= 64:
                raise bad(f"residual_bins[{i}].element_bits", b.element_bits, "between 1 and 64")
            if b.num_elements < 1:
                raise bad(f"residual_bins[{i}].num_elements", b.num_elements, "at least 1")
        covered = sum(b.num_elements for b in self.residual_bins)
        if covered > self.k - self.exact_k:
            raise bad("residual_bins", [b.num_elements for b in self.residual_bins],
                      f"their num_elements sum to {covered}, more than k - exact_k = {self.k - self.exact_k}")
        if self.exact_k < self.k and not self.polynomial_terms and not self.residual_bins:
            raise bad("polynomial_terms", self.polynomial_terms,
                      f"with exact_k ({self.exact_k}) < k ({self.k}) the other values need polynomial_terms or residual_bins")

    # ------------------------------------------------------------------ layout
    @property
    def index_bits(self) -> int:
        """ceil(log2 d), computed exactly (DistillKit computes it in float32: the same for every d up to 2^22 but 2^21 + 1)."""
        return (self.d - 1).bit_length()

    @property
    def index_bytes(self) -> int:
        return (self.k * self.index_bits + 7) // 8

    @property
    def logprob_bytes(self) -> int:
        return (self.exact_k * DTYPES[self.exact_dtype][0] + len(self.polynomial_terms or ()) * DTYPES[self.term_dtype][0]
                + sum(b.nbytes for b in self.residual_bins))

    def describe_layout(self) -> str:
        parts = [f"exact_k={self.exact_k} x {self.exact_dtype}"]
        if self.polynomial_terms:
            parts.append(f"{len(self.polynomial_terms)} terms x {self.term_dtype}")
        parts += [f"bin of {b.num_elements} x {b.element_bits} bits + {b.scale_dtype} scale" for b in self.residual_bins]
        return " + ".join(parts)

    def to_dict(self) -> dict:
        """DistillKit's own spelling (its ``model_dump(mode="json")``): what a ``compression_config.yaml`` holds."""
        out = dataclasses.asdict(self)
        out["residual_bins"] = [dataclasses.asdict(b) for b in self.residual_bins]
        out["polynomial_terms"] = list(self.polynomial_terms) if self.polynomial_terms is not None else None
        return out

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DistillKitConfig:
        """From DistillKit's keys; a missing, unknown or wrong key is one ConfigError line naming it."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"DistillKit compression settings must be a mapping of keys to values, got {_show(data)}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise ConfigError(f"unknown DistillKit compression setting {key!r}; {hint}valid settings: {', '.join(names)}")
        missing = [key for key in REQUIRED if key not in data or data[key] is None and key != "residual_bins"]
        if missing:
            key = missing[0]
            also = f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""
            help_text = next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == key)
            raise ConfigError(
                f"DistillKit compression setting {key} is missing{also}: {help_text[0].lower()}{help_text[1:].rstrip('.')}; "
                f"pass --set {key}={_EXAMPLES[key]} or --config FILE (a DistillKit compression_config.yaml, or its training "
                "YAML with teacher.logprob_compressor), as used when the logits were captured")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("d", "k", "exact_k"):
                kwargs[key] = _int(key, value)
            elif key in ("delta_encoding", "error_diffusion", "normalize_t"):
                kwargs[key] = _bool(key, value)
            elif key in ("exact_dtype", "term_dtype"):
                kwargs[key] = _dtype(key, value)
            elif key == "polynomial_terms":
                kwargs[key] = _terms(value)
            elif key == "residual_bins":
                kwargs[key] = _bins(value)
        return cls(**kwargs)


def _int(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer() or isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ConfigError(f"DistillKit compression setting {key} must be an integer, got {_show(value)} (e.g. --set {key}={_EXAMPLES.get(key, 1)})")


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"DistillKit compression setting {key} must be true or false, got {_show(value)}")


def _dtype(key: str, value: Any) -> str:
    if not isinstance(value, str) or value not in DTYPES:
        raise ConfigError(f"DistillKit compression setting {key} must be one of {', '.join(DTYPES)}, got {_show(value)}")
    return value


def _terms(value: Any) -> tuple[int | str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"DistillKit compression setting polynomial_terms must be a list such as [0, 1, 2, sqrt], got {_show(value)}")
    out: list[int | str] = []
    for term in value:
        if isinstance(term, bool) or not isinstance(term, (int, str)) or isinstance(term, str) and term not in SPECIAL_TERMS and not term.lstrip("-").isdigit():
            raise ConfigError(f"DistillKit compression setting polynomial_terms holds {_show(term)}: each term is an integer power or one of {', '.join(SPECIAL_TERMS)}")
        out.append(term if isinstance(term, str) and term in SPECIAL_TERMS else int(term))
    return tuple(out)


def _bins(value: Any) -> tuple[ResidualBin, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"DistillKit compression setting residual_bins must be a list of bins ([] for none), got {_show(value)}")
    names = [f.name for f in dataclasses.fields(ResidualBin)]
    out = []
    for i, b in enumerate(value):
        where = f"residual_bins[{i}]"
        if not isinstance(b, Mapping):
            raise ConfigError(f"DistillKit compression setting {where} must be a mapping with {', '.join(names)}, got {_show(b)}")
        unknown = [key for key in b if key not in names]
        missing = [key for key in names if key not in b]
        if unknown or missing:
            what = f"unknown key {unknown[0]!r}" if unknown else f"{missing[0]} is missing"
            raise ConfigError(f"DistillKit compression setting {where}: {what}; a bin has {', '.join(names)}, e.g. "
                              "{scale_dtype: float16, element_bits: 8, num_elements: 16}")
        out.append(ResidualBin(_dtype(f"{where}.scale_dtype", b["scale_dtype"]), _int(f"{where}.element_bits", b["element_bits"]),
                               _int(f"{where}.num_elements", b["num_elements"])))
    return tuple(out)


# ---------------------------------------------------------------------- finding and loading settings
def find_config_file(src: str | Path) -> Path | None:
    """The ``compression_config.yaml`` DistillKit's capture writes next to its Parquet files: in SRC (a folder)
    or SRC's folder (a file), else one level up (a dataset whose files sit in ``data/``)."""
    src = Path(src)
    folder = src if src.is_dir() else src.parent
    for where in (folder, folder.parent):
        for name in CONFIG_FILES:
            if (where / name).is_file():
                return where / name
    return None


def settings_from_file(path: str | Path) -> dict:
    """The compression settings in a YAML/JSON file: a bare compression config, a ``logprob_compressor:``
    section, or a DistillKit training config (``teacher.logprob_compressor``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"compression config {path} does not exist; pass an existing YAML or JSON file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"compression config {path} is not valid YAML/JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"compression config {path} must hold a mapping of DistillKit settings")
    teacher = data.get("teacher")
    if isinstance(teacher, dict) and ("logprob_compressor" in teacher or "legacy_logit_compression" in teacher):
        data = teacher
    if data.get("logprob_compressor") is None and data.get("legacy_logit_compression") is not None:
        raise ConfigError(f"{path} describes DistillKit's legacy compression (legacy_logit_compression: packed_indices, "
                          "exact_values, coeffs), which kdcache import does not read; only logprob_compressor datasets")
    if "logprob_compressor" in data:
        data = data["logprob_compressor"]
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: logprob_compressor must be a mapping of DistillKit settings")
    return dict(data)


def load_config(src: str | Path | None = None, config_file: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> tuple[DistillKitConfig, Path | None]:
    """Settings from ``config_file`` (else the file found next to ``src``), then ``overrides`` on top;
    returns the config and the file it read (None: overrides only)."""
    found = Path(config_file) if config_file is not None else (find_config_file(src) if src is not None else None)
    data = settings_from_file(found) if found is not None else {}
    data.update(overrides or {})
    return DistillKitConfig.from_mapping(data), found


# ---------------------------------------------------------------------- bit packing
def unpack_bits(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """[P, >= ceil(n*bits/8)] uint8, big-endian bit stream of n codes of ``bits`` bits -> [P, n] uint64."""
    data = np.asarray(data, dtype=np.uint8)
    P = data.shape[0]
    need = (n * bits + 7) // 8
    if data.shape[1] < need:
        raise ValueError(f"{n} codes of {bits} bits need {need} bytes, got {data.shape[1]}")
    if bits <= 57:
        # Every 8 codes fill exactly `bits` bytes, so code j of each group of 8 sits at the same bytes and shift:
        # 8 strided passes (each over a code's <= 8 bytes) instead of a gather per code (6x faster at 18 bits).
        G = (n + 7) // 8
        groups = np.zeros((P, G * bits), dtype=np.uint8)
        groups[:, :need] = data[:, :need]
        groups = groups.reshape(P, G, bits)
        out = np.empty((P, G, 8), dtype=np.uint64)
        for j in range(8):
            start = j * bits
            first, last = start // 8, (start + bits - 1) // 8
            word = np.zeros((P, G), dtype=np.uint64)
            for q in range(first, last + 1):
                word = (word << np.uint64(8)) | groups[:, :, q]
            out[:, :, j] = (word >> np.uint64((last + 1) * 8 - start - bits)) & np.uint64((1 << bits) - 1)
        return out.reshape(P, G * 8)[:, :n]
    stream = np.unpackbits(data[:, :need], axis=1, bitorder="big")[:, : n * bits].reshape(P, n, bits)
    out = np.zeros((P, n), dtype=np.uint64)
    for b in range(bits):  # wide codes (58-64 bits): one vectorised step per bit
        out = (out << np.uint64(1)) | stream[:, :, b].astype(np.uint64)
    return out


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """[P, n] codes < 2^bits -> [P, ceil(n*bits/8)] uint8, big-endian bit stream, zero-padded."""
    codes = np.asarray(codes).astype(np.uint64)
    P, n = codes.shape
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    stream = ((codes[:, :, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(P, n * bits)
    return np.packbits(stream, axis=1, bitorder="big")


# ---------------------------------------------------------------------- floats
def _read_floats(data: np.ndarray, start: int, n: int, dtype: str) -> np.ndarray:
    width, np_dtype = DTYPES[dtype]
    chunk = np.ascontiguousarray(data[:, start : start + n * width])
    if np_dtype is None:  # bfloat16: the upper 16 bits of a float32
        return (chunk.view("<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return chunk.view(np_dtype).astype(np.float64)


def _round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values as stored in ``dtype`` (round to nearest even), back in float64."""
    return _read_floats(_float_bytes(values, dtype), 0, values.shape[1], dtype)


def _float_bytes(values: np.ndarray, dtype: str) -> np.ndarray:
    """[P, n] floats -> [P, n * width] little-endian bytes of ``dtype``."""
    width, np_dtype = DTYPES[dtype]
    P = values.shape[0]
    if np_dtype is None:
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype("<u2")
        rounded[np.isnan(values)] = 0x7FC0
        return rounded.view(np.uint8).reshape(P, values.shape[1] * width)
    return np.ascontiguousarray(values, dtype=np_dtype).view(np.uint8).reshape(P, values.shape[1] * width)


def term_matrix(cfg: DistillKitConfig) -> np.ndarray:
    """[k - exact_k, len(terms)] float64: each polynomial term at t."""
    n = cfg.k - cfg.exact_k
    t = np.linspace(0.0, 1.0, n) if cfg.normalize_t else np.arange(n, dtype=np.float64)
    cols = [np.sqrt(t) if term == "sqrt" else np.exp(t) if term == "exp" else t ** int(term) for term in cfg.polynomial_terms or ()]
    return np.stack(cols, axis=-1) if cols else np.zeros((n, 0))


# ---------------------------------------------------------------------- decode / encode
def decode_logprobs(cfg: DistillKitConfig, data: np.ndarray) -> np.ndarray:
    """[P, logprob_bytes] uint8 ``compressed_logprobs`` -> [P, k] float64 log-probabilities, rank order."""
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != cfg.logprob_bytes:
        raise ValueError(f"expected [P, {cfg.logprob_bytes}] bytes, got {data.shape}")
    P, n = data.shape[0], cfg.k - cfg.exact_k
    offset = 0
    exact = _read_floats(data, 0, cfg.exact_k, cfg.exact_dtype)
    offset += cfg.exact_k * DTYPES[cfg.exact_dtype][0]
    rest = np.zeros((P, n))
    if cfg.polynomial_terms:
        m = len(cfg.polynomial_terms)
        coeffs = _read_floats(data, offset, m, cfg.term_dtype)
        offset += m * DTYPES[cfg.term_dtype][0]
        rest += coeffs @ term_matrix(cfg).T
    at = 0
    for b in cfg.residual_bins:
        scale = _read_floats(data, offset, 1, b.scale_dtype)
        offset += DTYPES[b.scale_dtype][0]
        nbytes = (b.num_elements * b.element_bits + 7) // 8
        codes = unpack_bits(data[:, offset : offset + nbytes], b.element_bits, b.num_elements).astype(np.float64)
        offset += nbytes
        steps = codes * 2.0 - 1.0 if b.element_bits == 1 else codes - float(2 ** (b.element_bits - 1))
        rest[:, at : at + b.num_elements] += steps * scale
        at += b.num_elements
    values = np.concatenate([exact, rest], axis=1)
    return np.cumsum(values, axis=1) if cfg.delta_encoding else values


def decode_ids(cfg: DistillKitConfig, data: np.ndarray) -> np.ndarray:
    """[P, index_bytes] uint8 ``bytepacked_indices`` -> [P, k] int64 token ids, rank order."""
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != cfg.index_bytes:
        raise ValueError(f"expected [P, {cfg.index_bytes}] bytes, got {data.shape}")
    return unpack_bits(data, cfg.index_bits, cfg.k).astype(np.int64)


def encode_positions(cfg: DistillKitConfig, ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The format's writer, for tests and round trips (DistillKit's capture is the real one): [P, k] ids and
    log-probs (any order) -> ([P, logprob_bytes], [P, index_bytes]) uint8, sorted most likely first.

    Float64 throughout, fit by least squares, residuals rounded to nearest; ``error_diffusion`` (a choice of
    the writer, same layout) is not implemented here."""
    if cfg.error_diffusion:
        raise ConfigError("this writer does not implement error_diffusion (decoding reads such files); set error_diffusion=false")
    ids, logprobs = np.asarray(ids), np.asarray(logprobs, dtype=np.float64)
    if ids.shape != logprobs.shape or ids.ndim != 2 or ids.shape[1] != cfg.k:
        raise ValueError(f"ids and logprobs must both be [P, k={cfg.k}], got {ids.shape} and {logprobs.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= 2**cfg.index_bits):
        raise ValueError(f"ids must lie in [0, 2^{cfg.index_bits})")
    order = np.argsort(-logprobs, axis=1, kind="stable")
    lp, ids = np.take_along_axis(logprobs, order, 1), np.take_along_axis(ids, order, 1)
    values = np.concatenate([lp[:, :1], np.diff(lp, axis=1)], axis=1) if cfg.delta_encoding else lp
    chunks = [_float_bytes(values[:, : cfg.exact_k], cfg.exact_dtype)]
    rest = values[:, cfg.exact_k :]
    if cfg.polynomial_terms:
        X = term_matrix(cfg)
        coeffs = _round_to(rest @ np.linalg.pinv(X).T, cfg.term_dtype)
        chunks.append(_float_bytes(coeffs, cfg.term_dtype))
        rest = rest - coeffs @ X.T
    at = 0
    for b in cfg.residual_bins:
        v = rest[:, at : at + b.num_elements]
        top = 1.0 if b.element_bits == 1 else float(2 ** (b.element_bits - 1))
        lo, hi = (0.0, 1.0) if b.element_bits == 1 else (-top, top - 1.0)
        peak = np.abs(v).max(axis=1, keepdims=True)
        scale = _round_to(np.where(peak > 0, peak / top, 1.0), b.scale_dtype)
        safe = np.where(scale > 0, scale, 1.0)
        codes = np.clip(np.rint(v / safe), lo, hi) - lo
        chunks += [_float_bytes(scale, b.scale_dtype), pack_bits(codes.astype(np.uint64), b.element_bits)]
        at += b.num_elements
    return np.concatenate(chunks, axis=1).astype(np.uint8), pack_bits(ids.astype(np.uint64), cfg.index_bits)


def with_tail(logprobs: np.ndarray, vocab_size: int, probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([P, k] log-probs, their probabilities, [P] tail log-mass) from decoded top-k log-probs (``probs``:
    their exp, if already computed): see the module docstring."""
    lp = np.asarray(logprobs, dtype=np.float64)
    p = np.exp(lp) if probs is None else probs
    mass = p.sum(axis=1)
    over = mass > 1.0
    if over.any():
        lp, p = lp.copy(), p.copy()
        lp[over] -= np.log(mass[over])[:, None]
        p[over] /= mass[over][:, None]
    if lp.shape[1] >= vocab_size:
        return lp, p, np.full(len(lp), -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(mass >= 1.0, -np.inf, np.log(np.maximum(1.0 - mass, TAIL_FLOOR)))
    return lp, p, tail


# ---------------------------------------------------------------------- writing DistillKit files (tests)
def write_distillkit(path: str | Path, rows: Iterable[Mapping[str, Any]], cfg: DistillKitConfig, row_group_rows: int = 64) -> Path:
    """A Parquet file in DistillKit's layout, for tests and round trips: each row has ``input_ids`` [T],
    ``topk_ids`` and ``topk_logprobs`` [P, k], and optionally ``attention_mask``/``labels`` [T] and ``id``;
    columns as DistillKit's ``compressed_logit_schema`` (input_ids list<uint64>, bytes list<list<uint8>>)."""
    path = Path(path)
    writer: pq.ParquetWriter | None = None
    batch: list[Mapping[str, Any]] = []

    def flush() -> None:
        nonlocal writer
        if not batch:
            return
        table = _distillkit_table(batch, cfg)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
        batch.clear()

    try:
        for row in rows:
            batch.append(row)
            if len(batch) >= row_group_rows:
                flush()
        flush()
    finally:
        if writer is not None:
            writer.close()
    return path


def _nested(per_row: list[np.ndarray], inner_width: int) -> pa.Array:
    """Rows of [P, width] uint8 -> list<list<uint8>>."""
    counts = np.array([len(r) for r in per_row], dtype=np.int32)
    outer = np.zeros(len(per_row) + 1, dtype=np.int32)
    np.cumsum(counts, out=outer[1:])
    inner = np.arange(outer[-1] + 1, dtype=np.int32) * inner_width
    flat = np.concatenate([r.reshape(-1) for r in per_row]) if per_row else np.zeros(0, np.uint8)
    return pa.ListArray.from_arrays(pa.array(outer), pa.ListArray.from_arrays(pa.array(inner), pa.array(flat, pa.uint8())))


def _distillkit_table(rows: list[Mapping[str, Any]], cfg: DistillKitConfig) -> pa.Table:
    lps, idx = [], []
    for r in rows:
        a, b = encode_positions(cfg, np.asarray(r["topk_ids"]).reshape(-1, cfg.k), np.asarray(r["topk_logprobs"]).reshape(-1, cfg.k))
        lps.append(a)
        idx.append(b)
    cols = {"input_ids": pa.array([np.asarray(r["input_ids"], dtype=np.uint64) for r in rows], pa.list_(pa.uint64())),
            "compressed_logprobs": _nested(lps, cfg.logprob_bytes), "bytepacked_indices": _nested(idx, cfg.index_bytes)}
    for name in ("attention_mask", "labels"):
        if any(name in r for r in rows):
            cols[name] = pa.array([np.asarray(r[name], dtype=np.int64) for r in rows], pa.list_(pa.int64()))
    if any("id" in r for r in rows):
        cols["id"] = pa.array([str(r["id"]) for r in rows], pa.string())
    return pa.table(cols)
