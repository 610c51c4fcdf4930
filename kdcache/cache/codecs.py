"""Value codecs for float signals (log-probabilities, hidden states).

A codec names how float values are stored in Parquet. Token and id columns never go through a codec:
they are plain ``list<int32>`` so pyarrow, DuckDB, pandas and ``datasets`` read them directly.
Add a codec by adding an entry to ``CODECS``; the manifest records which one each column uses.

A *scaled* codec (``int8``) stores each row of a 2-D signal (one token's vector) with its own scale in a
companion ``<column>_scale`` list<float32> column, named by the column's ``scale_column`` in the manifest;
the writer and reader encode and decode whole row groups at once (``encode_rows``/``decode_rows``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa

from kdcache.errors import ConfigError


@dataclass(frozen=True)
class FloatCodec:
    name: str
    arrow_type: pa.DataType
    numpy_dtype: type
    max_abs_error_note: str
    scaled: ClassVar[bool] = False
    """True: values need a per-row scale column (``encode_rows``/``decode_rows``), not ``encode``/``decode``."""

    def encode(self, values: np.ndarray) -> np.ndarray:
        return _convert(values, self.numpy_dtype)

    def decode(self, values: np.ndarray) -> np.ndarray:
        return _convert(values, np.float32)


def _convert(values: np.ndarray, dtype: type) -> np.ndarray:
    """Float casts on the hot path: torch's vectorised half conversion is ~3x numpy's."""
    values = np.asarray(values)
    if values.dtype == dtype:
        return values
    if torch is not None and values.dtype in _TORCH and np.dtype(dtype) in _TORCH:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(values)).to(_TORCH[np.dtype(dtype)]).numpy()
    return values.astype(dtype)


try:
    import torch

    _TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
except ImportError:  # pragma: no cover - the cache layer works without torch, only slower
    torch = None
    _TORCH = {}


@dataclass(frozen=True)
class BFloat16Codec(FloatCodec):
    """bfloat16 (fp32's exponent, 8 bits of mantissa) kept as the upper 16 bits of each float32 in a uint16
    column, Arrow having no bfloat16 type. For hidden states: half fp32's bytes like fp16, with a relative
    error up to 2^-8 instead of 2^-11, but no overflow above 65,504, where fp16 turns an LLM's outlier
    activations into inf. Rounds to nearest, ties to even, like torch's cast (the tests' reference)."""

    def encode(self, values: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16  # round to nearest, ties to even
        out = rounded.astype(np.uint16)
        out[np.isnan(values)] = 0x7FC0  # a NaN whose payload sits in the low bits must not round to inf
        return out

    def decode(self, values: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(values, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)


@dataclass(frozen=True)
class Int8RowCodec(FloatCodec):
    """Symmetric int8 with one float32 scale per row (per token): ``scale = max|x| / 127``, ``q = round(x / scale)``
    (to nearest), decoded as ``q * scale``. The error of every value is at most ``scale / 2 = max|x| / 254`` of its
    own token (plus float32 rounding), so a token's relative L2 error is at most ``sqrt(H) / 254 * max|x| / |x|``;
    an all-zero token has scale 0 and decodes to zeros. H + 4 bytes per token instead of 2H (fp16/bf16)."""

    scaled: ClassVar[bool] = True

    def encode(self, values: np.ndarray) -> np.ndarray:
        raise TypeError("int8 needs a scale per row: use encode_rows")

    def decode(self, values: np.ndarray) -> np.ndarray:
        raise TypeError("int8 needs a scale per row: use decode_rows")

    def encode_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, D] floats -> ([N, D] int8, [N] float32 scales), vectorised over all rows."""
        x = np.asarray(rows, dtype=np.float32)
        scale = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32) if x.size else np.zeros(len(x), np.float32)
        safe = np.where(scale > 0, scale, np.float32(1))[:, None]
        q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
        return q, scale

    def decode_rows(self, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """[N, D] int8 and [N] scales -> [N, D] float32."""
        return np.asarray(q).astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]


CODECS: dict[str, FloatCodec] = {
    "fp32": FloatCodec("fp32", pa.float32(), np.float32, "exact float32"),
    "fp16": FloatCodec("fp16", pa.float16(), np.float16, "IEEE half: relative error <= 2^-11 (about 0.005 nats at logprob -10)"),
    "bf16": BFloat16Codec("bf16", pa.uint16(), np.uint16, "bfloat16 bits in uint16: relative error <= 2^-8, fp32's range"),
    "int8": Int8RowCodec("int8", pa.int8(), np.int8, "int8 with a float32 scale per token: error <= max|x| / 254 of that token"),
}


def get_codec(name: str) -> FloatCodec:
    try:
        return CODECS[name]
    except KeyError:
        raise ConfigError(f"unknown codec {name!r}; valid codecs: {', '.join(sorted(CODECS))}") from None
