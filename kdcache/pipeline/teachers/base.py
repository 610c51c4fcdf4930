"""What a teacher backend must provide to the generate stage.

A backend scores token sequences (teacher forcing) into top-k log-probabilities, the tail mass,
entropies and hidden states, and optionally writes continuations. Scoring output per sequence of T
tokens, all numpy:

- ``topk_ids`` [T-1, k] int32 and ``topk_logprobs`` [T-1, k] float32 (temperature 1, most likely first)
- ``tail_logprob`` [T-1] float32: log of the mass outside the top-k (-inf when k equals the vocab)
- ``target_logprob`` [T-1] and ``entropy`` [T-1] float32
- ``hidden_<L>`` [T, H] float32 for each requested layer
- ``qkv_<L>`` [T, dq+dk+dv] float32 for each block in ``Teacher.attention_layers`` (pre-RoPE q|k|v projections)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from kdcache.errors import ConfigError
from kdcache.pipeline.teachers.sampling import SparseSampling


@dataclass
class ScoreRequest:
    """Teacher-force these sequences; the result is one score dict per sequence."""

    sequences: list[np.ndarray]
    seeds: list[int] | None = None  # one per sequence, for sampled targets
    inputs: list[dict] | None = None  # per sequence, the row fields a teacher that reads other input takes (Teacher.input_fields)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


@dataclass
class GenerateRequest:
    """Continue each prompt ``cfg.num_samples`` times, then score prompt + continuation.

    The result holds, per prompt, a list of ``(sequence, scores)`` with ``sequence`` = prompt +
    continuation cut to ``max_length`` tokens. ``seeds`` (one per prompt) make sampled continuations
    independent of batching (up to the float rounding of batched logits), so a resumed cache matches an
    uninterrupted one.
    """

    prompts: list[np.ndarray]
    seeds: list[int]
    cfg: Any  # GenerationConfig
    max_length: int

    @property
    def num_tokens(self) -> int:
        return sum(min(len(p) + self.cfg.max_new_tokens, self.max_length) * self.cfg.num_samples for p in self.prompts)


Request = ScoreRequest | GenerateRequest


class Teacher(ABC):
    """A loaded-on-demand teacher. ``identity()`` must not need the weights in memory."""

    tokenizer: Any
    #: True when a batch costs its longest sequence times its size (padded forward passes); False when
    #: the engine packs sequences, so a batch costs its total tokens.
    pads_batches: bool = True
    #: How ``entropy`` is computed: "exact" over the full vocabulary, or "topk_tail" (the entropy of the
    #: top-k plus one tail bucket, a lower bound) for engines that return only the top-k.
    entropy_kind: str = "exact"
    #: What draws sampled continuations; recorded in the cache settings, because another sampler draws
    #: other continuations from the same seeds (so a cache is never resumed under a different one).
    sampler: str = "engine"
    #: Whether ``load()`` may draw progress bars (generate sets it from its ``progress``; ``--quiet`` turns it off).
    progress: bool = True
    #: Decoder blocks (1..num_layers) whose q/k/v projections ``score`` also returns as ``qkv_<L>``; generate
    #: sets it (after ``describe_attention`` accepted them) before ``load()``.
    attention_layers: tuple[int, ...] = ()
    #: Row fields the teacher reads instead of the row's tokens (an image path for a vision teacher); generate passes
    #: them along as ScoreRequest.inputs, and the tokens are the student's only.
    input_fields: tuple[str, ...] = ()

    def describe_attention(self, blocks: list[int]) -> dict:
        """``{"sizes": [dq, dk, dv], "num_heads", "num_kv_heads", "head_dim"}`` of the chosen blocks, without the
        weights; a one-line ConfigError when this backend or model cannot provide them."""
        raise ConfigError(f"the {type(self).__name__} backend cannot store attention_layers; use --backend transformers")

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
        """Bring the weights into memory (slow); called once, after all settings are validated. Draws no
        progress bar when ``self.progress`` is False."""

    @abstractmethod
    def score(
        self, sequences: list[np.ndarray], top_k: int, hidden_layers: list[int],
        sampling: SparseSampling | None = None, seeds: list[int] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Teacher-forced distributions for each sequence (see module docstring); with ``sampling``,
        also ``sampled_ids``/``sampled_weights``/``sampled_sizes`` drawn with one seed per sequence."""

    @abstractmethod
    def generate(self, prompts: list[np.ndarray], cfg: Any, seeds: list[int], max_length: int | None = None) -> list[list[np.ndarray]]:
        """For each prompt, ``cfg.num_samples`` continuations (token arrays, without the prompt), decoded
        together. Sampled ones draw from the prompt's seed (not from an RNG the batch shares), and none
        needs to run past ``max_length`` tokens including the prompt."""

    def classes(self) -> list[str] | None:
        """A classifier teacher's labels in logit order (its scores then hold example-level ``class_logits``
        [C] and ``class_entropy``); None for teachers without classes."""
        return None

    def max_sequence_length(self) -> int | None:
        """Longest sequence the engine accepts (None: no limit beyond the data config's)."""
        return None

    def close(self) -> None:
        """Release the weights and any engine processes."""

    def describe_layers(self, layers: list[int]) -> dict[str, str]:
        """What each stored hidden layer's tensor is, in words (recorded in the manifest's scoring settings)."""
        from kdcache.pipeline.teachers.layer_capture import describe

        return {str(layer): describe(layer, self.num_layers) for layer in layers}

    def run(self, requests: Iterable[Request], top_k: int, hidden_layers: list[int], sampling: SparseSampling | None = None) -> Iterator[list]:
        """Results of each request, in order. Synchronous here; engines with their own scheduler
        override this to keep several requests in flight."""
        for req in requests:
            if isinstance(req, ScoreRequest):
                yield self.score(req.sequences, top_k, hidden_layers, sampling, req.seeds) if req.sequences else []
            else:
                yield self.generate_and_score(req, top_k, hidden_layers, sampling)

    def generate_and_score(
        self, req: GenerateRequest, top_k: int, hidden_layers: list[int], sampling: SparseSampling | None = None
    ) -> list[list[tuple[np.ndarray, dict]]]:
        """Continuations, then one teacher-forced pass over prompt + continuation."""
        if not req.prompts:
            return []
        conts = self.generate(req.prompts, req.cfg, req.seeds, req.max_length)
        # Empty continuations (the teacher stopped at once) have nothing to learn from and are dropped.
        seqs = [
            [np.concatenate([p, c]).astype(np.int32)[: req.max_length] for c in samples if len(c)]
            for p, samples in zip(req.prompts, conts)
        ]
        flat = [s for samples in seqs for s in samples]
        seeds = [seed * 31 + j for seed, samples in zip(req.seeds, seqs) for j in range(len(samples))]
        scored = iter(self.score(flat, top_k, hidden_layers, sampling, seeds) if flat else [])
        return [[(s, next(scored)) for s in samples] for samples in seqs]


TeacherFactory = Callable[[Any], Teacher]  # GenerateConfig -> Teacher
BACKENDS: dict[str, TeacherFactory] = {}


def register_backend(name: str) -> Callable[[TeacherFactory], TeacherFactory]:
    def deco(factory: TeacherFactory) -> TeacherFactory:
        if name in BACKENDS:
            raise ValueError(f"teacher backend {name!r} registered twice")
        BACKENDS[name] = factory
        return factory

    return deco


def build_teacher(cfg: Any) -> Teacher:
    """The teacher named by ``cfg.backend`` (a GenerateConfig), weights not yet loaded."""
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"unknown teacher backend {cfg.backend!r}; valid backends: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[cfg.backend](cfg)


def _resolve(indices: list[int], num_layers: int, first: int, what: str, unit: str) -> list[int]:
    """Indices in [first, num_layers], negatives counting from the end (-1 the last), sorted and unique."""
    out = []
    for i in indices:
        idx = i + num_layers + 1 if i < 0 else i
        if not first <= idx <= num_layers:
            raise ConfigError(f"{what} {i} out of range: the teacher has {unit} {first}..{num_layers} (or -1..-{num_layers + 1 - first})")
        out.append(idx)
    return sorted(set(out))


def resolve_layers(layers: list[int], num_layers: int) -> list[int]:
    """Layer indices in [0, num_layers]: 0 is the embedding output, negatives count from the end."""
    return _resolve(layers, num_layers, 0, "hidden layer", "layers")


def resolve_blocks(blocks: list[int], num_layers: int) -> list[int]:
    """Decoder block numbers in [1, num_layers] (-1 the last), for attention_layers."""
    return _resolve(blocks, num_layers, 1, "attention layer", "blocks")
