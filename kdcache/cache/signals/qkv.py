"""``qkv``: block L's pre-RoPE q|k|v projections per token, for attention-relation losses.

Settings: ``layers``, ``sizes`` [dq, dk, dv], ``num_heads``, ``num_kv_heads``, ``head_dim``, ``codec``."""

from __future__ import annotations

from typing import Mapping

from kdcache.cache.signals.base import Signal, coded_columns
from kdcache.cache.signals.registry import register


def qkv_column(layer: int) -> str:
    return f"qkv_{layer}"


class QKV(Signal):
    name = "qkv"
    schema_rank = 50

    def entry(self, s: Mapping) -> dict:
        sizes = [int(x) for x in s["sizes"]]
        columns: dict = {}
        for layer in s["layers"]:
            columns.update(coded_columns(qkv_column(layer), "T", sum(sizes), s.get("codec", "fp16")))
        return {
            "layers": list(s["layers"]), "sizes": sizes, "num_heads": int(s["num_heads"]),
            "num_kv_heads": int(s["num_kv_heads"]), "head_dim": int(s["head_dim"]),
            "tensor": "pre-RoPE q/k/v projections of block L (outputs of self_attn.q_proj, k_proj, v_proj), "
                      "concatenated q|k|v per token",
            "columns": columns,
        }


register(QKV())
