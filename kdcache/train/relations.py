"""Attention-based KD as in MiniLMv2: the student's self-attention relations match the teacher's.

The cache stores the teacher's query, key and value projections of chosen blocks (``generate --set
attention_layers=[...]``, before rotary embeddings): 2 * (d_q + d_k + d_v) bytes per token and block in fp16,
1,920 B for SmolLM2-135M, whatever the sequence length, where attention maps would cost num_heads * T * 2 B per
token (2,304 at T = 128) and grow with T. From them the trainer builds, per relation head, the scaled
dot-product distributions ``softmax(x x^T / sqrt(d_r))`` for x in {q, k, v} (query-query, key-key, value-value),
causal like the model, and minimises KL(teacher || student) per query position. Splitting each side's
concatenated projections into the same number of relation heads is what lets a student with 4 heads learn
from a teacher with 9 (and grouped-query k/v of any width): the relation matrices are T x T on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kdcache.config import NON_NEGATIVE, doc
from kdcache.errors import ConfigError
from kdcache.train.terms import Needs, Term, TermConfig, TermContext, layer_pairs, register_term, stored_layers, teacher_depth

QKV_FIX = "regenerate the cache with `kdcache generate --backend transformers --set attention_layers=[LAYERS]`"
_RELATIONS = {"qq": 0, "kk": 1, "vv": 2}


@dataclass
class AttentionConfig(TermConfig):
    mapping: Any = doc("Which student block matches which stored teacher block: uniform (same relative depth), last, or "
                       "explicit [[student, teacher], ...] (blocks 1..L).", "uniform")
    relations: list[str] = doc("Self-attention relations matched: any of qq, kk, vv (MiniLMv2 uses all three).",
                               default_factory=lambda: ["qq", "kk", "vv"])
    relation_heads: int = doc("Relation heads each side's q, k and v are split into (0: the student's attention heads); "
                              "must divide every width involved.", 0, valid=NON_NEGATIVE)


def relation_log_probs(x: torch.Tensor, heads: int, valid: torch.Tensor) -> torch.Tensor:
    """log softmax(x_r x_r^T / sqrt(d_r)) over earlier valid positions: [B, heads, T, T] from x [B, T, d]."""
    B, T, d = x.shape
    xr = x.float().view(B, T, heads, d // heads).transpose(1, 2)
    scores = xr @ xr.transpose(-1, -2) / math.sqrt(d // heads)
    allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None] & valid[:, None, None, :]
    return torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).masked_fill(~allowed, float("-inf"))


def relation_kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per (batch, head, query) over keys, 0 * log 0 = 0: [B, heads, T]."""
    p = t.exp()
    keep = p > 0  # masked keys (later or padded positions) are -inf on both sides
    return (p * (torch.where(keep, t, 0.0) - torch.where(keep, s, 0.0))).sum(-1)


class AttentionTerm(Term):
    def __init__(self, cfg: AttentionConfig, pairs: list[tuple[int, int]], sizes: list[int], heads: int):
        super().__init__()
        self.cfg, self.pairs, self.sizes, self.heads = cfg, pairs, sizes, heads
        self.needs = Needs(columns=tuple(sorted({f"qkv_{t}" for _, t in pairs})), qkv=tuple(sorted({s for s, _ in pairs})))

    def forward(self, out, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        valid = batch.attention_mask.bool()
        total = 0.0
        for s, t in self.pairs:
            teacher = torch.split(batch.signals[f"qkv_{t}"], self.sizes, dim=-1)
            for rel in self.cfg.relations:
                i = _RELATIONS[rel]
                kl = relation_kl(relation_log_probs(teacher[i], self.heads, valid), relation_log_probs(out.qkv[s][i], self.heads, valid))
                total = total + (kl.mean(1) * valid).sum()  # mean over relation heads, sum over real query positions
        total = total / (len(self.pairs) * len(self.cfg.relations))
        return total, {"attention": total.detach()}


@register_term("attention", AttentionConfig, "attention KD (MiniLMv2): q-q, k-k, v-v self-attention relations match the cached teacher blocks'")
def build_attention(cfg: AttentionConfig, ctx: TermContext) -> AttentionTerm:
    bad = [r for r in cfg.relations if r not in _RELATIONS]
    if bad or not cfg.relations:
        raise ConfigError(f"{ctx.where}.relations must be a non-empty list of qq, kk, vv, got {cfg.relations}")
    info = ctx.manifest.signals.get("qkv") or {}
    pairs = layer_pairs(cfg.mapping, ctx.student_layers, stored_layers(ctx.manifest, "qkv"), teacher_depth(ctx.manifest, "qkv"),
                        ctx.where, "attention block", QKV_FIX, first=1)
    text = ctx.model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    student = [text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim, text.num_key_value_heads * head_dim]
    sizes = [int(x) for x in info["sizes"]]
    heads = cfg.relation_heads or int(text.num_attention_heads)
    widths = [w for rel in cfg.relations for w in (student[_RELATIONS[rel]], sizes[_RELATIONS[rel]])]
    if any(w % heads for w in widths):
        ok = [h for h in range(1, min(widths) + 1) if all(w % h == 0 for w in widths)]
        raise ConfigError(f"{ctx.where}.relation_heads {heads} does not divide the q/k/v widths {sorted(set(widths))}; "
                          f"use --set {ctx.where}.relation_heads=N with N one of {', '.join(map(str, ok[-6:]))}")
    return AttentionTerm(cfg, pairs, sizes, heads)
