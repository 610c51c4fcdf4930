"""Sampled sparse teacher targets (RS-KD; "Sparse Logit Sampling", ACL 2025, arXiv 2503.16870).

A top-k cache moves the tail's mass onto the head, so students trained on it come out overconfident.
Drawing N tokens per position from a proposal q (the teacher at ``temperature``) and storing each
distinct token with the importance weight ``count/N * p/q`` gives an unbiased estimate of the teacher
distribution p: ``E[sum_j w_j onehot(x_j)] = p``. Cross-entropy of the student against those weights
therefore has, in expectation, exactly the gradient of full-vocabulary KL(p || student).

Draws use inverse-CDF sampling on uniforms from one generator per sequence, so a sequence's samples
do not depend on how sequences were batched (a resumed cache equals an uninterrupted one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SparseSampling:
    draws: int  # N tokens drawn per position, with replacement
    temperature: float = 1.0  # proposal q = softmax(log p / temperature)


def sequence_uniforms(seeds: list[int], lengths: list[int], draws: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[sum(lengths), draws] uniforms in [0, 1): sequence i's block comes from its own seed."""
    parts = [torch.rand(n, draws, generator=torch.Generator().manual_seed(int(s))) for s, n in zip(seeds, lengths)]
    return torch.cat(parts).to(device) if parts else torch.zeros(0, draws, device=device)


def sample_seed(seed: int, sample: int) -> int:
    """Seed of continuation ``sample`` of the prompt whose seed is ``seed``."""
    return (seed * 1_000_003 + sample) % 2**63


def row_uniforms(seeds: list[int], steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[len(seeds), steps] uniforms in [0, 1): row i's come from its own seed alone, and its first t are the
    same whatever ``steps`` is (the CPU generator fills in order), so the batch's length cap changes nothing."""
    return sequence_uniforms(seeds, [steps] * len(seeds), 1, device).reshape(len(seeds), steps)


def draw_next_tokens(scores: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of ``scores`` [B, V] by inverse CDF on ``u`` [B]: softmax at ``temperature``,
    restricted to the smallest set of most likely tokens holding ``top_p`` of the mass (nucleus)."""
    probs = torch.softmax(scores.float() / temperature, dim=-1)
    if top_p < 1.0:
        srt, order = probs.sort(dim=-1, descending=True)
        drop = srt.cumsum(dim=-1) - srt >= top_p  # mass before this token already reaches top_p
        probs = torch.zeros_like(probs).scatter_(1, order, srt.masked_fill(drop, 0.0))
    cdf = probs.cumsum(dim=-1)
    return torch.searchsorted(cdf, (u[:, None] * cdf[:, -1:]).contiguous(), right=True).clamp_max_(scores.shape[-1] - 1)


def sample_sparse(logp: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct drawn tokens per row of ``logp`` [P, V] with their importance weights.

    Returns ``ids`` and ``weights`` (flat, row-major, ids ascending within a row) and ``sizes`` [P]
    (distinct tokens per row). ``u`` [P, N] holds the uniforms, one per draw.
    """
    P, N = u.shape
    logq = logp if temperature == 1.0 else torch.log_softmax(logp / temperature, dim=-1)
    cdf = torch.cumsum(logq.exp(), dim=-1)
    # Scale by the row's own total so float32 rounding of the CDF never leaves a draw past the end.
    draws = torch.searchsorted(cdf, (u * cdf[:, -1:]).contiguous(), right=True).clamp_max_(logp.shape[-1] - 1)
    srt, _ = draws.sort(dim=-1)
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    sizes = first.sum(-1)
    starts = first.reshape(-1).nonzero().squeeze(1)
    counts = torch.diff(starts, append=torch.tensor([P * N], device=starts.device))
    rows = torch.div(starts, N, rounding_mode="floor")
    ids = srt.reshape(-1)[starts]
    log_ratio = (logp[rows, ids] - logq[rows, ids]).double()
    weights = counts.double() / N * log_ratio.exp()
    return ids, weights.float(), sizes


def split_by_sequence(ids: np.ndarray, weights: np.ndarray, sizes: np.ndarray, positions: list[int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Flat sampled arrays over several sequences -> one (ids, weights, sizes) triple per sequence."""
    out = []
    pos_ends = np.cumsum(positions)
    entry_ends = np.concatenate([[0], np.cumsum(sizes)])
    p0 = 0
    for p1 in pos_ends:
        e0, e1 = entry_ends[p0], entry_ends[p1]
        out.append((ids[e0:e1].astype(np.int32), weights[e0:e1], sizes[p0:p1].astype(np.uint16)))
        p0 = p1
    return out
