"""The transformers teacher: any causal LM from a local folder, a .gguf file or a hub id; CPU or CUDA.

Logits are produced chunk by chunk from the final hidden states, so a batch never holds more than a
chunk of [tokens, vocab]; top-k, tail mass, entropy and the target's log-probability are all computed on
the device (capture.py: by default without an fp32 copy of the chunk) and only k+3 numbers per position
come back to the host.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdcache.errors import ConfigError, KDCacheError
from kdcache.fingerprint import json_hash, tree_fingerprint
from kdcache.modeling import resolve_device, selected_features
from kdcache.weights import load_error, refuse_pickle_only
from kdcache.pipeline.teachers.base import Teacher, register_backend
from kdcache.pipeline.teachers.capture import CaptureSpec, capture_positions, resolve_capture
from kdcache.pipeline.teachers.layer_capture import attention_modules, capture, capture_qkv, hooks_match, layer_modules
from kdcache.pipeline.teachers.sampling import (
    SparseSampling, draw_next_tokens, row_uniforms, sample_seed, sequence_uniforms, split_by_sequence,
)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".json", ".model")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return _DTYPES[dtype]


def locate_model(model: str) -> tuple[str, str | None, bool]:
    """(folder or hub id, gguf file name or None, is_local). Raises a clear error for a missing path."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"teacher {model} is a file but not a .gguf; pass a model folder, a .gguf file or a hub id")
        return str(path.parent), path.name, True
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path), ggufs[0].name, True
            raise ConfigError(f"model folder {model} has no config.json; pass a folder written by save_pretrained or a .gguf file")
        return str(path), None, True
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith(".gguf")
    if looks_like_path or not model:
        raise ConfigError(f"model path {model} does not exist; pass a model folder, a .gguf file or a hub id")
    return model, None, False


def load_tokenizer(model: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    folder, gguf, _ = locate_model(model)
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise KDCacheError(f"cannot load tokenizer of {model}: {str(exc).splitlines()[0][:200]}") from None


class TransformersTeacher(Teacher):
    sampler = "kdcache-inverse-cdf"  # _SeededSampler below

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        allow_pickle_weights: bool = False,
        logits_chunk_tokens: int = 1024,
        tail_temperatures: tuple[float, ...] = (),
        capture: str = "auto",
    ):
        from transformers import AutoConfig

        self.model_name = model
        self.tail_temperatures = tuple(tail_temperatures)  # exact tempered tail mass stored for these T
        self.folder, self.gguf_file, self.is_local = locate_model(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.trust_remote_code = trust_remote_code
        self.allow_pickle_weights = allow_pickle_weights
        if self.is_local and not self.gguf_file and not allow_pickle_weights:  # GGUF is not pickle
            refuse_pickle_only(self.folder, "teacher", "allow_pickle_weights")
        self.logits_chunk_tokens = logits_chunk_tokens
        self.capture_fn = resolve_capture(capture, self.device)
        try:
            self.config = AutoConfig.from_pretrained(self.folder, gguf_file=self.gguf_file, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise KDCacheError(f"cannot load teacher config from {model}: {str(exc).splitlines()[0][:200]}") from None
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        self.model: Any = None
        self._layer_modules: list | None = None  # set by load(): the modules hooked for hidden states

    # -- identity, without weights
    def identity(self) -> dict:
        cfg = self.config.to_dict()
        for key in ("quantization_config", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
            cfg.pop(key, None)
        src = Path(self.folder) / self.gguf_file if self.gguf_file else Path(self.folder)
        return {
            "name": self.model_name,
            "path": str(src.resolve()) if self.is_local else self.model_name,
            "backend": "transformers",
            "architecture": self._architecture(),
            "config_hash": json_hash(cfg),
            "weights_fingerprint": tree_fingerprint(src, _WEIGHT_SUFFIXES, sampled=True) if self.is_local else None,
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    def _architecture(self) -> str:
        """The causal-LM class; GGUF configs carry no ``architectures``, so ask transformers' auto mapping."""
        if self.config.architectures:
            return self.config.architectures[0]
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(self.config.model_type, type(self.config).__name__)

    @property
    def vocab_size(self) -> int:
        return int(self.config.get_text_config().vocab_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.get_text_config().num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.get_text_config().hidden_size)

    def describe_attention(self, blocks: list[int]) -> dict:
        """Shapes of the chosen blocks' q/k/v projections from a weightless (meta-device) copy of the model, so a
        model without ``self_attn.q_proj/k_proj/v_proj`` is refused before its weights load."""
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(self.config, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot build {self.model_name} to find its attention projections ({' '.join(str(exc).split())[:160]}); "
                              "drop attention_layers") from None
        mods = attention_modules(skeleton, blocks)
        if isinstance(mods, str):
            raise ConfigError(f"attention_layers need Llama-style attention: {mods}; drop attention_layers for this teacher")
        q, k, v = (int(m.weight.shape[0]) for m in mods[blocks[0]])
        text = self.config.get_text_config()
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or q // heads)
        return {"layers": list(blocks), "sizes": [q, k, v], "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim}

    def _attention_capture(self):
        """Hooks on the q/k/v projections of ``attention_layers`` (none: a capture that records nothing)."""
        if not self.attention_layers:
            return capture_qkv({})
        mods = attention_modules(self.model, list(self.attention_layers))
        if isinstance(mods, str):  # describe_attention checked the same structure before loading
            raise ConfigError(f"attention_layers need Llama-style attention: {mods}; drop attention_layers for this teacher")
        return capture_qkv(mods)

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        if self.model is not None:
            return
        log.info("loading teacher %s on %s (%s)", self.model_name, self.device, self.dtype)
        try:
            with loading_bars(self.progress):
                model = AutoModelForCausalLM.from_pretrained(
                    self.folder, gguf_file=self.gguf_file, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                    # safetensors only (GGUF is not pickle): a .bin is unpickled, which can run code
                    use_safetensors=None if self.gguf_file or self.allow_pickle_weights else True,
                )
        except (OSError, ValueError) as exc:
            raise load_error("teacher", self.model_name, exc, self.allow_pickle_weights, "allow_pickle_weights") from None
        self.model = model.to(self.device).eval()
        modules = layer_modules(self.model)
        self._layer_modules = modules if modules is not None and hooks_match(self.model, modules, self.device) else None
        if self._layer_modules is None:
            log.info("hidden states of %s come from output_hidden_states (its layers could not be hooked one by one)", self.model_name)

    def close(self) -> None:
        self.model = None
        self._layer_modules = None

    def _with_layers(self, forward: Callable[[bool], Any], layers: list[int],
                     hidden_of: Callable[[Any], Any] = lambda out: out.hidden_states) -> tuple[Any, dict[int, torch.Tensor]]:
        """``forward(output_hidden_states)``'s result and the chosen layers' [B, T, H]: from hooks on those
        layers only, or, for a model they do not fit, from the model's own hidden_states (``hidden_of``)."""
        if layers and self._layer_modules is not None:
            with capture(self._layer_modules, layers) as got:
                return forward(False), got
        result = forward(bool(layers))
        return result, {layer: hidden_of(result)[layer] for layer in layers}

    # -- scoring
    def _pad(self, sequences: list[np.ndarray]):
        """Right-padded ids, attention mask, [B, T-1] mask of real next-token positions, lengths."""
        lens = torch.tensor([len(s) for s in sequences])
        B, T = len(sequences), int(lens.max())
        ids = torch.zeros(B, T, dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        attn = (torch.arange(T)[None, :] < lens[:, None]).long()
        ids, attn = ids.to(self.device), attn.to(self.device)
        valid = (torch.arange(T - 1)[None, :] < (lens - 1)[:, None]).to(self.device)  # [B, T-1]
        return ids, attn, valid, lens

    def _features(self, ids: torch.Tensor, attn: torch.Tensor, valid: torch.Tensor, all_layers: bool) -> tuple[torch.Tensor, Any, Any]:
        """(features at the valid positions, head or None, raw outputs with .hidden_states): see selected_features."""
        return selected_features(self.model, ids, attn, valid, output_hidden_states=all_layers)

    @torch.inference_mode()
    def score(
        self, sequences: list[np.ndarray], top_k: int, hidden_layers: list[int],
        sampling: SparseSampling | None = None, seeds: list[int] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        assert self.model is not None, "call load() first"
        ids, attn, valid, lens = self._pad(sequences)
        B = len(sequences)
        targets = ids[:, 1:][valid]
        with self._attention_capture() as qkv:
            (feats, head, out), hidden = self._with_layers(
                lambda all_layers: self._features(ids, attn, valid, all_layers),
                hidden_layers, hidden_of=lambda r: r[2].hidden_states)
        del out  # under output_hidden_states it holds every layer; only the chosen ones are kept
        V = self.vocab_size
        k = min(top_k, V)
        u = None
        if sampling is not None:
            u = sequence_uniforms(seeds if seeds is not None else [0] * B, (lens - 1).tolist(), sampling.draws, self.device)
        spec = CaptureSpec(k, self.tail_temperatures, sampling.temperature if sampling is not None else 1.0)
        got = capture_positions(feats, head, targets, V, spec, self.capture_fn, self.logits_chunk_tokens, u)
        flat = {n: v.cpu().numpy() for n, v in got.items()}
        positions = (lens - 1).tolist()
        splits = np.cumsum(positions)[:-1]
        sampled = {n: flat.pop(n) for n in ("sampled_ids", "sampled_weights", "sampled_sizes") if n in flat}
        per_seq = {n: np.split(v, splits) for n, v in flat.items()}
        results = [{n: per_seq[n][i] for n in per_seq} for i in range(B)]
        if sampled:
            triples = split_by_sequence(sampled["sampled_ids"], sampled["sampled_weights"], sampled["sampled_sizes"], positions)
            for r, (s_ids, s_w, s_n) in zip(results, triples):
                r.update(sampled_ids=s_ids, sampled_weights=s_w, sampled_sizes=s_n)
        if hidden:
            self._add_hidden(results, hidden, lens)
        if qkv:
            self._add_hidden(results, qkv, lens, "qkv")
        return results

    @staticmethod
    def _add_hidden(results: list[dict], hidden: dict[int, torch.Tensor], lens: torch.Tensor, prefix: str = "hidden") -> None:
        for layer, tensor in hidden.items():
            hs = tensor.float().cpu().numpy()
            for i, n in enumerate(lens.tolist()):
                results[i][f"{prefix}_{layer}"] = hs[i, :n]

    @torch.inference_mode()
    def hidden_states(self, sequences: list[np.ndarray], layers: list[int]) -> list[dict[str, np.ndarray]]:
        """Only the chosen layers' hidden states and ``attention_layers``' q/k/v (no logits): the second pass
        behind engines that cannot return them themselves."""
        assert self.model is not None, "call load() first"
        ids, attn, _, lens = self._pad(sequences)
        with self._attention_capture() as qkv:
            _, hidden = self._with_layers(
                lambda all_layers: self.model.get_decoder()(input_ids=ids, attention_mask=attn, output_hidden_states=all_layers), layers)
        results: list[dict] = [{} for _ in sequences]
        self._add_hidden(results, hidden, lens)
        self._add_hidden(results, qkv, lens, "qkv")
        return results

    # -- generation
    @torch.inference_mode()
    def generate(self, prompts: list[np.ndarray], cfg: Any, seeds: list[int], max_length: int | None = None) -> list[list[np.ndarray]]:
        assert self.model is not None, "call load() first"
        from transformers import LogitsProcessorList

        n = cfg.num_samples
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.tokenizer.eos_token_id
        rows = [p for p in prompts for _ in range(n)]  # prompt i's samples are rows i*n .. i*n+n-1
        T = max(len(p) for p in rows)
        room = cfg.max_new_tokens if max_length is None else max(1, min(cfg.max_new_tokens, max_length - min(len(p) for p in rows)))
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(rows):  # left padding, so every prompt ends where generation starts
            ids[i, T - len(p) :] = torch.from_numpy(np.asarray(p, dtype=np.int64))
            attn[i, T - len(p) :] = 1
        processors = LogitsProcessorList()
        if cfg.do_sample:  # our own draws: transformers' sampler shares one RNG across the batch
            u = row_uniforms([sample_seed(s, j) for s in seeds for j in range(n)], room, self.device)
            processors.append(_SeededSampler(u, T, cfg.temperature, cfg.top_p))
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=attn.to(self.device), max_new_tokens=room,
            do_sample=False, logits_processor=processors, pad_token_id=pad, eos_token_id=eos,
        )
        new = out[:, T:].cpu().numpy()
        results: list[list[np.ndarray]] = []
        for i in range(len(prompts)):
            samples = []
            for seq in new[i * n : (i + 1) * n]:
                if eos is not None and (seq == eos).any():
                    seq = seq[: int(np.argmax(seq == eos)) + 1]
                if cfg.stop:
                    seq = seq[: _stop_end(self.tokenizer, seq, cfg.stop)]
                samples.append(seq.astype(np.int32))
            results.append(samples)
        return results


@contextlib.contextmanager
def loading_bars(progress: bool):
    """Progress bars while transformers loads a model only when ``progress`` and transformers' own switch
    (``transformers.utils.logging.disable_progress_bar``, which the CLI turns off) both allow them.

    transformers' GGUF loader draws "Converting and de-quantizing GGUF tensors..." with tqdm directly, past
    that switch, so its module's ``tqdm`` is swapped for a disabled one while loading, and put back."""
    from transformers.utils import logging as hf_logging

    if progress and hf_logging.is_progress_bar_enabled():
        yield
        return
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_loader
    except ImportError:  # pragma: no cover - a transformers without GGUF support
        gguf_loader = None
    real = getattr(gguf_loader, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if real is not None:
        gguf_loader.tqdm = functools.partial(real, disable=True)
    try:
        yield
    finally:
        if real is not None:
            gguf_loader.tqdm = real
        if was_enabled:
            hf_logging.enable_progress_bar()


class _SeededSampler:
    """A logits processor that draws each row's next token from its own uniforms and masks every other
    token, so greedy decoding emits the draw. A row's draws then come from its seed, not from an RNG the
    batch shares, and all rows decode together; only float rounding of batched logits (padding changes
    kernel shapes) can, rarely, move a draw (docs/benchmarks.md: 91% of continuations identical)."""

    def __init__(self, uniforms: torch.Tensor, prompt_width: int, temperature: float, top_p: float):
        self.u, self.T, self.temperature, self.top_p = uniforms, prompt_width, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.T
        tok = draw_next_tokens(scores, self.u[:, step], self.temperature, self.top_p)
        return torch.full_like(scores, -torch.inf).scatter_(1, tok, 0.0)


def _stop_end(tokenizer, seq: np.ndarray, stops: list[str]) -> int:
    """Length of ``seq`` up to and including the first token that completes a stop string. Applied after
    generation rather than through transformers' StopStringCriteria, which fails on some tokenizers
    (word-level ones); the cost is decoding past the stop point."""
    for n in range(1, len(seq) + 1):
        text = tokenizer.decode(seq[:n], skip_special_tokens=True)  # as vLLM matches stop strings
        if any(s in text for s in stops):
            return n
    return len(seq)


@register_backend("transformers")
def _from_config(cfg: Any) -> TransformersTeacher:
    return TransformersTeacher(cfg.teacher, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                               allow_pickle_weights=cfg.allow_pickle_weights, tail_temperatures=tuple(cfg.tail_temperatures),
                               capture=cfg.capture)
