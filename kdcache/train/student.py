"""Build or load the student, and refuse one that cannot learn from the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from kdcache.cache import Cache
from kdcache.errors import CacheMismatchError, ConfigError, KDCacheError
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.locations import check_model_folder
from kdcache.train.config import StudentConfig
from kdcache.weights import load_error, refuse_pickle_only


def _llama(cfg: StudentConfig, vocab_size: int, tokenizer: Any):
    from transformers import LlamaConfig

    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError("student.hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.attention_dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


STUDENT_ARCHS: dict[str, Callable[[StudentConfig, int, Any], Any]] = {"llama": _llama}


def load_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise KDCacheError(f"cannot load tokenizer from {path}: {str(exc).splitlines()[0][:200]}") from None


def build_student(cfg: StudentConfig, cache: Cache, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer), checked against the cache's tokenizer and vocabulary."""
    from transformers import AutoModelForCausalLM

    if cfg.path:
        check_model_folder(cfg.path, "student", "--student")
        if not cfg.allow_pickle_weights:
            refuse_pickle_only(Path(cfg.path).expanduser(), "student", "student.allow_pickle_weights")
        tokenizer = load_tokenizer(cfg.path, cfg.trust_remote_code)
        _check_tokenizer(tokenizer, cache, cfg.path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.path, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
                use_safetensors=None if cfg.allow_pickle_weights else True,  # a .bin is unpickled, which can run code
            )
        except (OSError, ValueError) as exc:
            raise load_error("student", cfg.path, exc, cfg.allow_pickle_weights, "student.allow_pickle_weights") from None
    else:
        if cfg.arch not in STUDENT_ARCHS:
            raise ConfigError(f"unknown student arch {cfg.arch!r}; valid: {', '.join(sorted(STUDENT_ARCHS))}")
        tok_path = cfg.tokenizer or cache.tokenizer_dir
        if tok_path is None:
            raise ConfigError(f"cache {cache.path} stores no tokenizer; set student.tokenizer to the teacher's tokenizer folder")
        tokenizer = load_tokenizer(str(tok_path), cfg.trust_remote_code)
        _check_tokenizer(tokenizer, cache, str(tok_path))
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(STUDENT_ARCHS[cfg.arch](cfg, cache.manifest.vocab_size, tokenizer))
    out_dim = model.get_output_embeddings().weight.shape[0]
    if out_dim != cache.manifest.vocab_size:
        raise CacheMismatchError(
            f"student predicts {out_dim} tokens but the cache's teacher has a vocabulary of {cache.manifest.vocab_size}; "
            "use a student with the teacher's vocabulary"
        )
    return model, tokenizer


def _check_tokenizer(tokenizer: Any, cache: Cache, where: str) -> None:
    want = cache.manifest.tokenizer
    have = tokenizer_fingerprint(tokenizer)
    if have != want["fingerprint"]:
        raise CacheMismatchError(
            f"student tokenizer {where} (fingerprint {have}, {len(tokenizer)} tokens) differs from the cache's "
            f"tokenizer (teacher {cache.manifest.teacher.get('name')}, fingerprint {want['fingerprint']}, "
            f"{want.get('tokenizer_size')} tokens); distil into a student that shares the teacher's tokenizer"
        )
