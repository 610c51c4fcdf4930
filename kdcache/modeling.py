"""Logits only where a loss needs them.

Running the decoder and then the output head on the selected positions avoids materialising
[batch, time, vocab] logits for padding and masked-out tokens. Models that transform logits after the
head (soft-capping, logit scaling) take the full forward so the numbers stay exact.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from kdcache.errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA on a machine without it is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    return dev


def autocast_for(precision: str, device: torch.device):
    """A context factory: bf16 autocast where asked for (or ``auto`` on bf16-capable CUDA), else nothing."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def decoder_layer_modules(model: Any) -> list[Any] | None:
    """The n + 1 modules whose outputs are ``hidden_states[0..n]`` (embeddings, blocks 1..n-1, the final norm after
    block n), or None when the decoder is not laid out as ``embed_tokens``/``layers``/``norm``. Teachers hook them to
    store hidden states and students to match them, so layer L means the same tensor on both sides."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    blocks = getattr(decoder, "layers", None)
    embed = getattr(decoder, "embed_tokens", None)
    norm = getattr(decoder, "norm", None)
    if decoder is None or blocks is None or embed is None or norm is None or len(blocks) == 0:
        return None
    return [embed, *list(blocks)[:-1], norm]


QKV_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def attention_modules(model: Any, blocks: list[int]) -> dict[int, tuple[Any, Any, Any]] | str:
    """{block: (q_proj, k_proj, v_proj)} for blocks numbered 1..n, or a one-line reason they cannot be hooked."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        return f"{type(model).__name__} has no decoder.layers"
    out = {}
    for b in blocks:
        attn = getattr(layers[b - 1], "self_attn", None)
        mods = tuple(getattr(attn, name, None) for name in QKV_PROJECTIONS)
        if attn is None or any(m is None for m in mods):
            return f"block {b} of {type(model).__name__} has no self_attn.q_proj/k_proj/v_proj (fused or other attention)"
        out[b] = mods
    return out


@contextlib.contextmanager
def output_hooks(modules: dict[Any, Any]) -> Iterator[dict[Any, torch.Tensor]]:
    """Forward hooks on ``{key: module}`` for the forwards inside the block; yields {key: the module's output}
    (its first element when it returns a tuple), filled as they run. Removed on exit, whatever happens."""
    out: dict[Any, torch.Tensor] = {}

    def keep(key: Any):
        def hook(module, args, output):
            out[key] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    handles = [module.register_forward_hook(keep(key)) for key, module in modules.items()]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def has_plain_head(model: Any) -> bool:
    cfg = model.config.get_text_config()
    return not any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale"))


def selected_features(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor, output_hidden_states: bool = False
) -> tuple[torch.Tensor, Any, Any]:
    """(features at ``select`` [N, *], head or None, raw outputs). ``select`` is [B, T-1]: row t predicts token t+1.

    Apply ``head`` (when not None) to features to get logits; a None head means features are logits.
    """
    if has_plain_head(model):
        out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
        return out.last_hidden_state[:, :-1][select], model.get_output_embeddings(), out
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
    return out.logits[:, :-1][select], None, out


def selected_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at ``select`` only (the head runs on the selected positions, not on padding)."""
    feats, head, _ = selected_features(model, input_ids, attention_mask, select)
    return head(feats) if head is not None else feats


def tempered_tail_logprob(logp: torch.Tensor, topk_ids: torch.Tensor, temperatures) -> torch.Tensor:
    """log of the probability mass outside ``topk_ids`` under softmax(logp / T), for each T: [N, len(temperatures)].

    This is what a top-k cache cannot recover later: at T != 1 the tail's share depends on how its mass
    is spread over the V - k tokens (T = 2: ``sum_j p_j^(1/2)``), not only on its total. ``logp`` is the full
    [N, V] log-distribution at temperature 1; -inf where the top-k is the whole vocabulary.
    """
    if not temperatures:
        return logp.new_zeros(logp.shape[0], 0)
    if topk_ids.shape[-1] >= logp.shape[-1]:
        return logp.new_full((logp.shape[0], len(temperatures)), float("-inf"))
    outside = logp.scatter(-1, topk_ids, float("-inf"))  # one masked copy serves every T
    return torch.stack([torch.logsumexp(outside / t, dim=-1) - torch.logsumexp(logp / t, dim=-1) for t in temperatures], dim=-1)
