"""A local torch module as the teacher: safetensors weights plus a Python entry point that the user names.

``--backend torch-module --teacher FOLDER --set module.entry_point=pkg.models:build --set module.kwargs={...}``:
``build(**kwargs)`` returns an ``nn.Module`` (your code, importable in your environment; never code read
from the teacher folder), ``FOLDER/model.safetensors`` holds its ``state_dict`` (loaded strictly; pickle
files are never read) and FOLDER holds a tokenizer saved with ``save_pretrained``. The module is called as
``model(input_ids=..., attention_mask=...)`` and returns next-token logits [B, T, V], or a dict with
``logits`` and optionally ``hidden_states`` (a tuple like transformers': 0 the embeddings, L block L), which
``hidden_layers`` and ``pooled_layers`` read. It declares ``num_layers`` and ``hidden_size`` as int attributes,
and ``vocab_size`` when its logits are wider than the tokenizer.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kdcache.errors import ConfigError, KDCacheError
from kdcache.fingerprint import json_hash, tree_fingerprint
from kdcache.modeling import resolve_device
from kdcache.pipeline.teachers.base import register_backend
from kdcache.pipeline.teachers.capture import resolve_capture
from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher, resolve_dtype

WEIGHTS = "model.safetensors"


def entry_point(spec: str):
    """The callable ``module:function`` names, imported from the environment; a one-line error otherwise."""
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"module.entry_point {spec!r} must be 'package.module:function' (a function that returns the nn.Module)")
    mod, fn = spec.split(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except ImportError as exc:
        raise ConfigError(f"module.entry_point: cannot import {mod!r} ({exc}); install it or add its folder to PYTHONPATH") from None
    except AttributeError:
        raise ConfigError(f"module.entry_point: {mod!r} has no {fn!r}") from None


class _Outputs(torch.nn.Module):
    """The user's module seen through the interface the transformers teacher scores: ``.logits`` (and
    ``.hidden_states``) on its output."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, input_ids, attention_mask, output_hidden_states: bool = False):
        out = self.module(input_ids=input_ids, attention_mask=attention_mask)
        if isinstance(out, torch.Tensor):
            out = {"logits": out}
        if output_hidden_states and "hidden_states" not in out:
            raise ConfigError("hidden_layers/pooled_layers need the module to return a dict with 'hidden_states'")
        return SimpleNamespace(logits=out["logits"], hidden_states=out.get("hidden_states"))


class TorchModuleTeacher(TransformersTeacher):
    def __init__(self, model: str, entry: str, kwargs: dict, device: str = "auto", dtype: str = "auto", capture: str = "auto"):
        from transformers import AutoTokenizer

        self.model_name, self.entry, self.kwargs = model, entry, dict(kwargs)
        self.folder, self.gguf_file, self.is_local = str(Path(model).expanduser()), None, True
        if not (Path(self.folder) / WEIGHTS).is_file():
            raise ConfigError(f"torch-module teacher {model} has no {WEIGHTS} (its state_dict in safetensors; pickle is never read)")
        self.build = entry_point(entry)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tail_temperatures, self.trust_remote_code, self.allow_pickle_weights = (), False, False
        self.logits_chunk_tokens = 1024
        self.capture_fn = resolve_capture(capture, self.device)
        with torch.device("meta"):  # the shape attributes, without allocating weights
            skeleton = self.build(**self.kwargs)
        missing = [a for a in ("num_layers", "hidden_size") if not isinstance(getattr(skeleton, a, None), int)]
        if missing:
            raise ConfigError(f"the module built by {entry} must declare {' and '.join(missing)} (int attributes)")
        self._shape = (int(skeleton.num_layers), int(skeleton.hidden_size))
        self._declared_vocab = int(getattr(skeleton, "vocab_size", 0) or 0)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        except (OSError, ValueError) as exc:
            raise KDCacheError(f"cannot load the tokenizer in {model} (save one there with save_pretrained): {str(exc).splitlines()[0][:200]}") from None
        self.model: Any = None
        self._layer_modules = None  # hidden states come from the module's own hidden_states

    def identity(self) -> dict:
        return {
            "name": self.model_name, "path": str(Path(self.folder).resolve()), "backend": "torch-module", "architecture": self.entry,
            "config_hash": json_hash({"entry_point": self.entry, "kwargs": self.kwargs}),
            "weights_fingerprint": tree_fingerprint(Path(self.folder) / WEIGHTS), "dtype": str(self.dtype).replace("torch.", ""),
        }

    @property
    def vocab_size(self) -> int:
        return self._declared_vocab or len(self.tokenizer)

    @property
    def num_layers(self) -> int:
        return self._shape[0]

    @property
    def hidden_size(self) -> int:
        return self._shape[1]

    def describe_attention(self, blocks: list[int]) -> dict:
        raise ConfigError("attention_layers need a Llama-style transformers teacher; drop them for --backend torch-module")

    def load(self) -> None:
        from safetensors.torch import load_file

        if self.model is not None:
            return
        module = self.build(**self.kwargs)
        try:
            module.load_state_dict(load_file(str(Path(self.folder) / WEIGHTS)), strict=True)
        except RuntimeError as exc:
            raise KDCacheError(f"{WEIGHTS} in {self.model_name} does not fit the module {self.entry} builds: {str(exc).splitlines()[0][:200]}") from None
        self.model = _Outputs(module.to(self.device, self.dtype)).eval()

    def _features(self, ids, attn, valid, all_layers):
        out = self.model(ids, attn, output_hidden_states=all_layers)
        return out.logits[:, :-1][valid], None, out  # logits: no separate head

    def generate(self, prompts, cfg, seeds, max_length=None):
        raise ConfigError("a torch-module teacher writes no continuations yet; drop generation.enabled")


@register_backend("torch-module")
def _from_config(cfg: Any) -> TorchModuleTeacher:
    if not cfg.module.entry_point:
        raise ConfigError("--backend torch-module needs the function that builds the module: --set module.entry_point=package.module:function")
    if cfg.generation.enabled or cfg.tail_temperatures:
        raise ConfigError("--backend torch-module: drop generation.enabled and tail_temperatures (not supported yet)")
    return TorchModuleTeacher(cfg.teacher, cfg.module.entry_point, cfg.module.kwargs, device=cfg.device, dtype=cfg.dtype, capture=cfg.capture)
