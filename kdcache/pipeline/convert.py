"""Turn a teacher that only transformers can read (a .gguf file) into a ``save_pretrained`` folder.

vLLM loads model folders; transformers dequantises GGUF files on load but refuses to save such a
model ("quantized with gguf ... not serializable"), so the weights are moved into a fresh model of the
same architecture without the quantization config and saved from there. Save in float32 when the
caches of both backends must agree to 1e-4 (bf16 rounding alone moves log-probabilities by ~1e-2).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from kdcache.errors import ConfigError
from kdcache.pipeline.teachers.transformers_backend import _DTYPES, load_tokenizer, locate_model

log = logging.getLogger(__name__)


def convert_model(src: str, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write ``src`` (a .gguf file, model folder or hub id) as a safetensors model folder at ``out``."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        if (out / "config.json").is_file():
            log.info("%s already holds a model; nothing to do (pass --overwrite to redo it)", out)
            return out
        raise ConfigError(f"{out} exists and is not empty; pass another directory")
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    folder, gguf, _ = locate_model(src)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=_DTYPES[dtype])
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    fresh.load_state_dict(model.state_dict(), assign=True, strict=False)
    fresh.tie_weights()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    load_tokenizer(src).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
