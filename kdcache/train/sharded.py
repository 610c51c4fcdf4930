"""FSDP2 (``fully_shard``) for ``distributed.strategy: fsdp``: the student's parameters, gradients and optimizer
moments split across the ranks, for students that do not fit one device.

Checkpoints keep the one format every run writes (a ``save_pretrained`` folder and the optimizer state in
``optimizer.state_dict()``'s own layout, by parameter index): the full tensors are gathered to rank 0 to be
written and every rank loads its shard from them, so an FSDP run resumes exactly, and its checkpoints and
``final/`` are those of any other run.
"""

from __future__ import annotations

from typing import Any

import torch

from kdcache.errors import ConfigError


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_student(model: Any) -> torch.nn.Module:
    """Each decoder block its own FSDP unit (gathered for its forward, freed after), the rest (embeddings, norm,
    head) the root's. The root is a closure module around the student (kdcache.train.distributed): the loss calls
    the backbone and the head separately (the head only on selected positions), so the root's gathering has to
    wrap the whole micro-batch, not the student's own forward. Returns it: run each forward through it."""
    from torch.distributed.fsdp import fully_shard

    from kdcache.train.distributed import Closure

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    blocks = getattr(decoder, "layers", None)
    if blocks is None or len(blocks) == 0:
        raise ConfigError("distributed.strategy fsdp shards the student's decoder blocks (model.layers), which this student lacks; "
                          "use a student.arch llama student or --set distributed.strategy=ddp")
    for block in blocks:
        fully_shard(block)
    root = Closure(model)
    fully_shard(root)
    return root


def _index_names(model: Any, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order ``optimizer.state_dict()`` numbers the parameters (group by group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_model_state(model: Any) -> dict[str, torch.Tensor]:
    """The whole student's weights on rank 0's CPU (every rank must call it; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options())
    # a tied head's weight is the embeddings' (one parameter, two names): saved once, as an unsharded save does
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in full.items() if k in own}


def full_optimizer_state(model: Any, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state on rank 0 in ``optimizer.state_dict()``'s layout (every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=_options())
    if not sd:
        return {}
    names = _index_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: st for n, st in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]}


def load_full_model_state(model: Any, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Every rank keeps its shard of the full ``weights``; returns (missing, unexpected) keys."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    keys = set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    return list(keys.missing_keys), list(keys.unexpected_keys)


def load_full_optimizer_state(model: Any, optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """The inverse of :func:`full_optimizer_state`: every rank holds the full state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _index_names(model, optimizer)
    by_name = {"state": {names[int(i)]: st for i, st in sd["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
