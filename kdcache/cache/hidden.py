"""What a cache stores of a hidden state: a fixed orthogonal projection and a subset of positions.

Both are defined here, in the cache layer, so a reader or trainer rebuilds them from the manifest alone
(``signals.hidden``), without the pipeline or a model:

- ``project_dim`` D > 0: the stored vector is ``h @ P`` with ``P = orthogonal_projection(width, D, project_seed)``,
  a [width, D] matrix with orthonormal columns (``P.T @ P = I``): a standard normal [width, D] matrix drawn
  from ``numpy.random.default_rng(project_seed)`` in float64, QR-decomposed, columns signed so R's diagonal is
  positive (a Haar-random orthonormal frame), cast to float32. Distances and inner products inside the span
  of P are kept exactly; ``h @ P @ P.T`` is h's orthogonal projection onto that span.
- ``positions`` ``stride:N`` keeps tokens 0, N, 2N, ...; ``fraction:F`` keeps max(1, round(F*T)) tokens drawn
  without replacement, seeded by ``positions_seed`` and the example id (the same rows on every machine and
  every run, whatever the batching); the kept positions are stored in ``hidden_positions`` (ascending).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from kdcache.errors import ConfigError

POSITIONS_HELP = "all, stride:N (every N-th token, N >= 1) or fraction:F (a seeded F of the tokens, 0 < F <= 1)"
_SPEC = re.compile(r"(all)|stride:(\d+)|fraction:([0-9.eE+-]+)")


def orthogonal_projection(width: int, dim: int, seed: int) -> np.ndarray:
    """[width, dim] float32 with orthonormal columns, a pure function of its arguments (see module docstring)."""
    if not 0 < dim < width:
        raise ConfigError(f"a projection needs 0 < dim < width, got dim {dim} for width {width}")
    g = np.random.default_rng(seed).standard_normal((width, dim))
    q, r = np.linalg.qr(g)
    q *= np.where(np.diag(r) < 0, -1.0, 1.0)
    return q.astype(np.float32)


def parse_positions(spec: str) -> tuple[str, float]:
    """``("all", 0)``, ``("stride", N)`` or ``("fraction", F)``; a one-line ConfigError for anything else."""
    m = _SPEC.fullmatch(str(spec).strip())
    if m is not None:
        if m.group(1):
            return "all", 0
        if m.group(2) is not None and int(m.group(2)) >= 1:
            return "stride", int(m.group(2))
        if m.group(3) is not None:
            try:
                f = float(m.group(3))
            except ValueError:
                f = -1.0
            if 0 < f <= 1:
                return "fraction", f
    raise ConfigError(f"hidden_positions must be {POSITIONS_HELP}, got {spec!r}; e.g. --set hidden_positions=stride:2")


def select_positions(spec: str, length: int, seed: int, example_id: str) -> np.ndarray:
    """The token positions (int32, ascending) whose hidden states an example of ``length`` tokens stores."""
    kind, arg = parse_positions(spec)
    if kind == "all":
        return np.arange(length, dtype=np.int32)
    if kind == "stride":
        return np.arange(0, length, int(arg), dtype=np.int32)
    n = min(length, max(1, int(round(arg * length))))
    digest = hashlib.blake2b(f"{seed}:{example_id}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return np.sort(rng.choice(length, size=n, replace=False)).astype(np.int32)
