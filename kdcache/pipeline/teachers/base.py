"""What a teacher backend must provide to the generate stage.

A backend scores token sequences (teacher forcing) into top-k log-probabilities, the tail mass,
entropies and hidden states, and optionally writes continuations. Scoring output per sequence of T
tokens, all numpy:

- ``topk_ids`` [T-1, k] int32 and ``topk_logprobs`` [T-1, k] float32 (temperature 1, most likely first)
- ``tail_logprob`` [T-1] float32: log of the mass outside the top-k (-inf when k equals the vocab)
- ``target_logprob`` [T-1] and ``entropy`` [T-1] float32
- ``hidden_<L>`` [T, H] float32 for each requested layer
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np

from kdcache.errors import ConfigError


class Teacher(ABC):
    """A loaded-on-demand teacher. ``identity()`` must not need the weights in memory."""

    tokenizer: Any

    @abstractmethod
    def identity(self) -> dict:
        """Name, path, config hash, weights fingerprint, dtype: recorded in the manifest."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Size of the teacher's output distribution (logits dimension)."""

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @abstractmethod
    def load(self) -> None:
        """Bring the weights into memory (slow); called once, after all settings are validated."""

    @abstractmethod
    def score(self, sequences: list[np.ndarray], top_k: int, hidden_layers: list[int]) -> list[dict[str, np.ndarray]]:
        """Teacher-forced distributions for each sequence (see module docstring)."""

    @abstractmethod
    def generate(self, prompts: list[np.ndarray], cfg: Any, seed: int) -> list[list[np.ndarray]]:
        """For each prompt, ``cfg.num_samples`` continuations (token arrays, without the prompt)."""


TeacherFactory = Callable[..., Teacher]
BACKENDS: dict[str, TeacherFactory] = {}


def register_backend(name: str) -> Callable[[TeacherFactory], TeacherFactory]:
    def deco(factory: TeacherFactory) -> TeacherFactory:
        if name in BACKENDS:
            raise ValueError(f"teacher backend {name!r} registered twice")
        BACKENDS[name] = factory
        return factory

    return deco


def build_teacher(name: str, **kwargs: Any) -> Teacher:
    if name not in BACKENDS:
        raise ConfigError(f"unknown teacher backend {name!r}; valid backends: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](**kwargs)


def resolve_layers(layers: list[int], num_layers: int) -> list[int]:
    """Layer indices in [0, num_layers]: 0 is the embedding output, negatives count from the end."""
    out = []
    for layer in layers:
        idx = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= idx <= num_layers:
            raise ConfigError(f"hidden layer {layer} out of range: the teacher has layers 0..{num_layers} (or -1..-{num_layers + 1})")
        out.append(idx)
    return sorted(set(out))
