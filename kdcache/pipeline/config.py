"""Configuration of the generate stage. Every field can be set in YAML or overridden from the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kdcache.cache.hidden import parse_positions
from kdcache.config import NON_NEGATIVE, POSITIVE, Valid, at_least, check_fields, doc, show, typed_sections
from kdcache.errors import ConfigError
from kdcache.locations import check_location, check_model_folder
from kdcache.pipeline.corpus import EMBEDDED_PREFIX


@dataclass
class DataConfig:
    source: str = doc(
        "Dataset: a local .jsonl/.json/.parquet/.csv/.txt file, a hub dataset name, or embedded:stdlib-docs "
        "(Python standard library docstrings, on every machine; fields text, source, module) or embedded:stdlib-modules (those "
        "of its 8 largest modules, interleaved: a classification set labelled by `module`), embedded:word-problems (arithmetic "
        "word problems with answers, a rationale row and an answer row each, fields task, prompt, response, question, answer) "
        "or embedded:word-problems-test (held-out problems, answer rows only).",
        "embedded:stdlib-docs",
    )
    split: str = doc("Split to read (hub datasets and local files alike).", "train")
    revision: str | None = doc(
        "Hub datasets: the git revision (commit sha, tag or branch) to read; recorded in the cache's dataset identity, "
        "so a cache made from another revision is never resumed into. null: the hub's default branch (unpinned).", None)
    format: Literal["auto", "text", "messages", "prompt_response", "tokens"] = doc(
        "How a row becomes tokens: text (one field, loss on every token), messages (chat list, loss on assistant "
        "turns), prompt_response (loss on the response), tokens (the field already holds token ids of the teacher's "
        "tokenizer, used as they are: no special tokens added, loss on every token). auto picks from the row's fields "
        "(a list of integers is tokens).",
        "auto",
    )
    field: str = doc("Field holding the text (format text), the chat messages (format messages) or the token ids (format tokens).", "text")
    prompt_field: str = doc("Prompt field for format prompt_response.", "prompt")
    response_field: str = doc("Response field for format prompt_response.", "response")
    chat_template: bool = doc("Render messages and prompt/response pairs with the tokenizer's chat template.", True)
    max_length: int = doc("Maximum tokens per example.", 512, valid=at_least(2))
    truncation: Literal["truncate", "skip"] = doc(
        "Rows longer than max_length: truncate keeps the first max_length tokens; skip drops and counts them.",
        "truncate",
    )
    max_rows: int | None = doc("Read at most this many dataset rows (None: all; counted after `where`).", None, valid=POSITIVE)
    where: dict[str, str | int | float | bool] = doc(
        "Read only rows whose fields equal these values, e.g. {task: answer}; a row without the field is skipped. "
        "Recorded in the cache's dataset identity.", default_factory=dict)
    strict: bool = doc("Fail on the first bad row (missing field, empty, wrong type) instead of counting it.", False)

    def __post_init__(self):
        check_fields(self)  # max_length: a token and its next-token target at least


@dataclass
class GenerationConfig:
    enabled: bool = doc("Let the teacher write continuations of each prompt and cache those (scored like any row).", False)
    max_new_tokens: int = doc("Tokens to generate per continuation.", 128, valid=POSITIVE)
    num_samples: int = doc("Continuations per prompt.", 1, valid=POSITIVE)
    do_sample: bool = doc("Sample (true) or greedy decoding (false).", False)
    temperature: float = doc("Sampling temperature.", 1.0, valid=POSITIVE)
    top_p: float = doc("Nucleus sampling threshold.", 1.0, valid=Valid(0, 1, lo_open=True))
    stop: list[str] = doc("Stop strings: a continuation ends after the first of these it produces (EOS always ends it).", default_factory=list)
    rows: Literal["all", "unanswered"] = doc(
        "Which rows the teacher continues: all (every row's prompt; a response in the data is dropped), or unanswered "
        "(prompt/response data: only rows whose response is empty or missing; the others are scored with their own "
        "response, so one cache mixes teacher-written and given targets, e.g. rationales written and answers given).", "all")
    prompt_tokens: int = doc(
        "Plain-text rows: the teacher continues the first N tokens of each row (0: the whole row). "
        "Chat and prompt/response rows always use their own prompt.", 0, valid=NON_NEGATIVE)

    def __post_init__(self):
        check_fields(self)
        if self.num_samples > 1 and not self.do_sample:
            raise ConfigError("generation.num_samples > 1 needs generation.do_sample=true (greedy gives identical samples)")


@dataclass
class VLLMConfig:
    """Engine settings of the vllm backend (ignored by the others)."""

    tensor_parallel_size: int = doc("GPUs that share each layer (tensor parallelism).", 1, valid=POSITIVE)
    max_model_len: int | None = doc("Engine context length; null: data.max_length + 1 (rows longer than this minus one follow data.truncation).", None, valid=at_least(3))
    gpu_memory_utilization: float = doc("Fraction of GPU memory the engine may take (weights + KV cache); lower it if the GPU runs out of memory or when storing hidden states (a second copy of the teacher computes them).", 0.9, valid=Valid(0, 1, lo_open=True))
    max_num_batched_tokens: int | None = doc("Tokens per engine step (null: vLLM's default). Prompt log-probabilities hold [tokens, vocab] fp32 logits per step, so lower this if memory runs out.", None, valid=POSITIVE)
    max_num_seqs: int | None = doc("Sequences per engine step (null: vLLM's default).", None, valid=POSITIVE)
    enforce_eager: bool | None = doc("Skip CUDA graphs / torch.compile; null: true on CPU (compiling takes minutes there), false on GPU.", None)
    kv_cache_gib: int = doc("KV cache size in GiB on CPU machines (sets VLLM_CPU_KVCACHE_SPACE unless already set).", 2, valid=POSITIVE)
    inflight_tokens: int = doc("Tokens handed to the engine ahead of the writer, so the engine never waits on the writer; bounds host memory.", 65536, valid=POSITIVE)

    def __post_init__(self):
        check_fields(self)


@dataclass
class TorchModuleConfig:
    """The teacher of the torch-module backend (kdcache/pipeline/teachers/module_backend.py)."""

    entry_point: str = doc("package.module:function that returns the teacher nn.Module (your code, imported from your environment).", "")
    kwargs: dict = doc("Keyword arguments of that function.", default_factory=dict)

    def __post_init__(self):
        check_fields(self)


@dataclass
class MediaConfig:
    """The input of the transformers-vision and transformers-audio backends (kdcache/pipeline/teachers/media_backend.py)."""

    field: str = doc("Row field holding the image or audio (PCM WAV) file's path, relative to root; empty: `image` for the "
                     "vision backend (what kdcache render-text writes), `audio` for the audio backend.", "")
    root: str = doc("Folder the paths are relative to (every path must stay inside it); empty: the working directory.", "")
    tokenizer: str = doc("Tokenizer of the student's text (the row's text field); stored with the cache.", "")

    def __post_init__(self):
        check_fields(self)


@dataclass
class GenerateConfig:
    teacher: str = doc("Teacher: a local model folder, a .gguf file, or a hub id.", "")
    backend: str = doc("Teacher backend: transformers (causal LMs, any machine), vllm (needs `pip install kdcache[vllm]`; see README) or "
                       "transformers-encoder (a sequence classifier's class logits or an encoder's states; with --top-k 0) or "
                       "torch-module (your nn.Module: --set module.entry_point=pkg.mod:fn, weights TEACHER/model.safetensors) or "
                       "transformers-vision / transformers-audio (an image or audio model reading each row's file, media.*; pooled "
                       "states and class logits, --top-k 0).", "transformers")
    out: str = doc("Cache directory to write (created; resumed if it holds the same settings).", "")
    overwrite: bool = doc("Replace an existing cache at `out` whose settings differ.", False)
    top_k: int = doc("Teacher log-probabilities kept per position (plus the tail mass); 0 keeps none (a sampled-only cache).", 64, valid=NON_NEGATIVE)
    sampled_tokens: int = doc(
        "RS-KD: tokens drawn per position from the teacher (with replacement), stored as distinct ids with importance "
        "weights, an unbiased sparse target (28 draws gave ~11 distinct for SmolLM2 on docstrings). 0: off.", 0, valid=Valid(0, 65535))
    proposal_temperature: float = doc("Temperature of the distribution the sampled tokens are drawn from (weights correct for it).", 1.0, valid=POSITIVE)
    tail_temperatures: list[float] = doc(
        "KD temperatures T != 1 to store the teacher's exact tail mass for (one float32 per position per T, e.g. [2.0]): "
        "with it, tail-bucket KD at T equals dense tempered KD bucketed; without it training tempers the k+1 buckets, "
        "an approximation. Needs the full logits (transformers backend).", default_factory=list, valid=POSITIVE)
    logprob_codec: Literal["fp16", "fp32"] = doc("How top-k log-probabilities are stored by the lists codec (and sampled weights).", "fp16")
    codec: str = doc(
        "Top-k codec (registry in kdcache/cache/topk_storage.py): lists (cache format 1: plain Parquet lists, int32 ids + "
        "logprob_codec values, 236 B/token at k=64) or sqrt-delta (format 2: sorted id gaps + values on a sqrt(p) grid "
        "chosen by a KL target, ~114 B/token at k=64 with a codec KL of 9e-5 nats; `kdcache export` turns it back into lists).",
        "lists")
    codec_options: dict[str, float] = doc(
        "The codec's parameters, e.g. {kl: 3e-5} for sqrt-delta (target mean KL over the k+1 buckets; or step: the grid "
        "step in sqrt(p)); recorded in the manifest.", default_factory=dict)
    hidden_layers: list[int] = doc("Hidden states to store: 0 is the embeddings, L the output of layer L, -1 the last.", default_factory=list)
    hidden_codec: Literal["fp16", "bf16", "fp32", "int8"] = doc(
        "How hidden states (and attention_layers' q/k/v) are stored: fp16 (relative error <= 2^-11, overflows above "
        "65,504), bf16 (<= 2^-8, fp32's range), fp32, int8 (one float32 scale per token, max|x|/127: error <= max|x|/254 "
        "of the token; D + 4 bytes per token instead of 2D).", "fp16")
    hidden_project_dim: int = doc(
        "Store hidden states projected to this width: h @ P with P a fixed [H, D] matrix with orthonormal columns, "
        "rebuilt from the manifest by kdcache.cache.hidden.orthogonal_projection(H, D, hidden_project_seed); applied "
        "before hidden_codec. Must be smaller than the teacher's hidden size. 0: full width.", 0, valid=NON_NEGATIVE)
    hidden_project_seed: int = doc("Seed of the projection matrix of hidden_project_dim.", 0)
    hidden_positions: str = doc(
        "Token positions whose hidden states are stored: all, stride:N (positions 0, N, 2N, ...) or fraction:F "
        "(max(1, round(F*T)) positions per example, drawn from seed and the example id); the kept positions are stored "
        "in the hidden_positions column.", "all")
    attention_layers: list[int] = doc(
        "Decoder blocks (1..num_layers, -1 the last) whose pre-RoPE query/key/value projections (self_attn.q_proj, "
        "k_proj, v_proj outputs) to store per token as qkv_<L>, for MiniLMv2-style relation KD: 2*(dq+dk+dv) B/token "
        "per block in fp16/bf16 (SmolLM2-135M: 1,920), whatever the sequence length. Stored with hidden_codec.",
        default_factory=list)
    pooled_layers: list[int] = doc(
        "Example-level teacher embeddings: for each layer L (hidden_layers numbering), one float32 vector per example, "
        "the `pooling` of hidden_states[L] over the row's tokens (column pooled_<L>), e.g. [-1] for the final normed state; "
        "what cross-task and cross-modal students learn from. Independent of hidden_layers (per-token states).", default_factory=list)
    pooling: Literal["mean", "last"] = doc("How pooled_layers pool a row's tokens: mean over all of them, or the last token's state.", "mean")
    keep_fields: list[str] = doc(
        "Dataset fields copied into the cache as one column each (scalars: text, integer, float, bool), e.g. a label "
        "[module] for a classifier student or the path of a paired image; typed by the first row, a row of another type "
        "is a counted bad row.", default_factory=list)
    context: str = doc(
        "Context distillation: text the teacher reads before each row and the student never sees (a system prompt, "
        "few-shot examples, a document); {field} placeholders are filled from the row (e.g. 'Docs of {source}:\\n'). "
        "The cache keeps the teacher's predictions at the row's own tokens only (offset per row in context_tokens). "
        "Empty: off.", "")
    device: str = doc("auto (cuda if available), cpu, cuda, cuda:N.", "auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc("Teacher compute dtype; auto: bf16 on CUDA, fp32 on CPU.", "auto")
    capture: str = doc(
        "How top-k, tail mass, entropy and sampled tokens are computed from the logits on the teacher's device "
        "(kdcache/pipeline/teachers/capture.py; transformers and torch-module backends): auto (compiled on CUDA, fused "
        "elsewhere), fused (top-k in the model's dtype, fp32 reductions over cache-sized blocks of rows, no fp32 copy of "
        "the logits), compiled (the same under torch.compile, fused into a few passes over each chunk: needs triton "
        "on CUDA or a C++ compiler on CPU, compiles once per run) or naive (fp32 log_softmax of each chunk). They agree "
        "to float32 rounding, so the choice is not part of the cache's settings.", "auto")
    batch_tokens: int = doc("Token budget per teacher forward pass (padded tokens).", 4096, valid=at_least(2))
    trust_remote_code: bool = doc("Allow model code from the model folder/hub (off unless you trust it).", False)
    allow_pickle_weights: bool = doc(
        "Allow teacher weights stored as pickle (pytorch_model.bin, .pt), which can run code when loaded; off: "
        "safetensors only (GGUF files are not pickle and always load).", False)
    seed: int = doc("Seed for sampled generation (each input row gets its own seed derived from it) and for hidden_positions=fraction:F.", 0)
    shard_tokens: int = doc(
        "Tokens per Parquet shard (a file; the unit a resume keeps). Shards and row groups end at whole input rows.", 4_000_000, valid=POSITIVE)
    row_group_tokens: int = doc(
        "Tokens per Parquet row group (the reader's unit of work), at most shard_tokens (a larger value is capped to it).", 16_384, valid=POSITIVE)
    commit_seconds: float = doc(
        "Commit the shard in progress once its first row has waited this many seconds, even if it holds fewer than "
        "shard_tokens tokens (its last row group is then shorter too): Ctrl-C or a crash loses at most this much "
        "teacher work. A fast teacher fills shards by tokens first.", 60.0, valid=POSITIVE)
    compression_level: int = doc("zstd level.", 1, valid=Valid(1, 22))
    write_queue: int = doc(
        "Input rows queued for the writer thread, which encodes, compresses, writes and fsyncs while the teacher runs on "
        "(0: write in the teacher's thread). Queued rows are work in flight: a kill loses them, a rerun redoes them.",
        256, valid=NON_NEGATIVE)
    num_shards: int | None = doc(
        "Job array: split the dataset into this many parts, each written by its own task into OUT/part-IIIII-of-NNNNN "
        "(input row r belongs to part r % num_shards), then joined by `kdcache merge --out OUT`. null: 1 (one cache in OUT); "
        "`kdcache generate` reads it from the environment when unset (KDCACHE_NUM_SHARDS, SLURM_ARRAY_TASK_COUNT).",
        None, valid=POSITIVE)
    shard_index: int | None = doc(
        "Job array: the part this task writes, 0..num_shards-1. null: 0; `kdcache generate` reads it from the environment "
        "when unset (SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX).", None, valid=NON_NEGATIVE)
    data: DataConfig = doc("Input dataset.", default_factory=DataConfig)
    generation: GenerationConfig = doc("Teacher continuations.", default_factory=GenerationConfig)
    vllm: VLLMConfig = doc("vLLM engine settings (backend vllm).", default_factory=VLLMConfig)
    module: TorchModuleConfig = doc("The torch-module backend's model: entry point and its arguments (weights: TEACHER/model.safetensors).",
                                    default_factory=TorchModuleConfig)
    media: MediaConfig = doc("The vision and audio backends' input: the file field, its root folder, the student's tokenizer.",
                             default_factory=MediaConfig)

    def __post_init__(self):
        typed_sections(self)
        check_fields(self)
        if self.top_k == 0 and self.sampled_tokens == 0 and not (self.pooled_layers or self.hidden_layers) and self.backend not in ("transformers-encoder", "transformers-vision", "transformers-audio"):
            raise ConfigError("nothing to store: pass --top-k K, --sampled-tokens N and/or --set pooled_layers=[L]")
        if len(set(self.tail_temperatures)) != len(self.tail_temperatures):
            raise ConfigError(f"tail_temperatures must be distinct, got {show(self.tail_temperatures)}")
        if self.tail_temperatures and not self.top_k:
            raise ConfigError("tail_temperatures describe the mass outside the top-k; pass --top-k K with them")
        parse_positions(self.hidden_positions)
        if not self.hidden_layers and (self.hidden_project_dim or parse_positions(self.hidden_positions)[0] != "all"):
            raise ConfigError("hidden_project_dim and hidden_positions choose how hidden states are stored; pass --hidden-layers L,... with them")
        if self.context:
            from kdcache.pipeline.context import placeholders

            placeholders(self.context)  # a malformed template is refused here
        from kdcache.cache.topk_storage import get_storage
        from kdcache.pipeline.teachers.capture import get_capture

        if self.capture != "auto":
            get_capture(self.capture)
        get_storage(self.codec).params(max(self.top_k, 1), 2**31 - 1, self.codec_options)  # an unknown codec or option: one line now
        if self.generation.rows != "all" and not self.generation.enabled:
            raise ConfigError(f"generation.rows={self.generation.rows} chooses which rows the teacher continues; add --set generation.enabled=true")
        if 0 in self.attention_layers:
            raise ConfigError("attention_layers are decoder blocks 1..num_layers (or -1 for the last); 0, the embeddings, has no attention")
        if self.num_shards is not None and self.shard_index is not None and self.shard_index >= self.num_shards:
            raise ConfigError(f"shard_index {self.shard_index} must be below num_shards {self.num_shards} (parts are numbered "
                              f"0 to {self.num_shards - 1}); pass the part with --shard-index and the number of parts with --num-shards")

    def validate(self) -> None:
        if not self.teacher:
            raise ConfigError("no teacher given; pass --teacher PATH (a model folder, .gguf file or hub id)")
        if not self.out:
            raise ConfigError("no output directory given; pass --out DIR")
        if self.backend == "torch-module":  # a folder of safetensors weights and a tokenizer, no config.json (the backend checks it)
            if not Path(self.teacher).expanduser().is_dir():
                raise ConfigError(f"--backend torch-module: teacher {self.teacher} is not a folder (it holds model.safetensors and a tokenizer)")
        else:
            check_model_folder(self.teacher, "teacher", "--teacher")
        if not self.data.source.startswith(EMBEDDED_PREFIX) and not Path(self.data.source).expanduser().exists():
            check_location(self.data.source, "dataset", "--dataset", kind="dataset")
