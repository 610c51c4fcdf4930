"""Hidden states of the chosen layers only, captured with forward hooks.

``output_hidden_states=True`` keeps every layer's [B, T, H] output alive until the forward ends; a cache
that stores three layers of a 30-layer teacher needs three. Layer L (``resolve_layers``' index) is the
tensor transformers reports as ``hidden_states[L]``: 0 the embedding output, 1..n-1 the output of
decoder block L, n the last block's output after the final norm (what the LM head reads). The hooks sit
on exactly those modules; a model whose decoder is not laid out as ``embed_tokens``/``layers``/``norm``,
or whose hooked tensors differ from its own ``hidden_states`` on a probe (e.g. an embedding scaled in the
model's forward), falls back to ``output_hidden_states``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch

from kdcache.modeling import attention_modules, decoder_layer_modules as layer_modules, output_hooks  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def describe(layer: int, num_layers: int) -> str:
    """What the stored tensor of ``layer`` is, in words, for the manifest."""
    if layer == 0:
        return "embedding output (input to block 1)"
    if layer == num_layers:
        return f"output of block {num_layers} after the final norm (the LM head's input)"
    return f"output of block {layer} (residual stream, before the next block)"


@contextlib.contextmanager
def capture(modules: list[Any], layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Hooks on the chosen layers' modules for one forward; yields {layer: [B, T, H]} filled by it."""
    with output_hooks({layer: modules[layer] for layer in layers}) as out:
        yield out


def hooks_match(model: Any, modules: list[Any], device: Any) -> bool:
    """Whether the hooked tensors equal the model's own ``hidden_states`` on a short probe, at every layer."""
    ids = torch.arange(1, 6, device=device)[None] % max(int(model.get_input_embeddings().weight.shape[0]), 1)
    layers = list(range(len(modules)))
    with torch.inference_mode(), capture(modules, layers) as got:
        ref = model.get_decoder()(input_ids=ids, output_hidden_states=True).hidden_states
    return len(ref) == len(modules) and all(torch.equal(got[i], ref[i]) for i in layers)


# -- attention: pre-RoPE q/k/v projections of chosen blocks
#
# Why q/k/v and not attention maps: MiniLMv2-style relation KD needs, per block, softmax(q q^T), softmax(k k^T)
# and softmax(v v^T) over a sequence, all of which a trainer rebuilds from the per-token projections. Those cost
# 2*(dq+dk+dv) B/token/block in fp16/bf16 (SmolLM2-135M: 576+192+192 -> 1,920 B) whatever the sequence length,
# while the attention maps themselves would be num_heads*T*2 B/token (9*128*2 = 2,304 B at T = 128), growing with T.
# RoPE is applied to q and k inside the attention's forward, after these projections, so the stored tensors are
# position-free; a trainer that wants the rotated ones applies the teacher's RoPE (its config is in the manifest).

@contextlib.contextmanager
def capture_qkv(modules: dict[int, tuple[Any, Any, Any]]) -> Iterator[dict[int, torch.Tensor]]:
    """Hooks on the chosen blocks' q/k/v projections for one forward; after it, {block: [B, T, dq+dk+dv]}."""
    out: dict[int, torch.Tensor] = {}
    with output_hooks({(b, j): m for b, mods in modules.items() for j, m in enumerate(mods)}) as parts:
        yield out
    for b in modules:
        if (b, 0) in parts:
            out[b] = torch.cat([parts[(b, j)] for j in range(3)], dim=-1)
