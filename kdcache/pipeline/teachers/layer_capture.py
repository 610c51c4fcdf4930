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

log = logging.getLogger(__name__)


def layer_modules(model: Any) -> list[Any] | None:
    """The n + 1 modules whose outputs are ``hidden_states[0..n]``, or None when the layout is not the usual one."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    blocks = getattr(decoder, "layers", None)
    embed = getattr(decoder, "embed_tokens", None)
    norm = getattr(decoder, "norm", None)
    if decoder is None or blocks is None or embed is None or norm is None or len(blocks) == 0:
        return None
    return [embed, *list(blocks)[:-1], norm]


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
    out: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(module, args, output):
            out[layer] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    handles = [modules[layer].register_forward_hook(keep(layer)) for layer in layers]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def hooks_match(model: Any, modules: list[Any], device: Any) -> bool:
    """Whether the hooked tensors equal the model's own ``hidden_states`` on a short probe, at every layer."""
    ids = torch.arange(1, 6, device=device)[None] % max(int(model.get_input_embeddings().weight.shape[0]), 1)
    layers = list(range(len(modules)))
    with torch.inference_mode(), capture(modules, layers) as got:
        ref = model.get_decoder()(input_ids=ids, output_hidden_states=True).hidden_states
    return len(ref) == len(modules) and all(torch.equal(got[i], ref[i]) for i in layers)
