"""Configuration of the train stage. Every field can be set in YAML or overridden from the CLI."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from kdcache.cache.filesystem import is_remote
from kdcache.config import FRACTION, NON_NEGATIVE, POSITIVE, Valid, at_least, check_fields, doc, show, typed_sections
from kdcache.errors import ConfigError
from kdcache.locations import check_model_folder
from kdcache.train.curriculum import CurriculumConfig

log = logging.getLogger(__name__)

# Flat keys of earlier versions, each now in the section of the one loss or pseudo-teacher it belonged to. Still
# accepted in YAML and --set (and read from the config.yaml of a run they wrote), with one warning naming the new key.
# {pseudo_teacher} is the run's pseudo-teacher (with none the key never had an effect and is dropped).
LEGACY_KEYS: dict[str, tuple[str, ...]] = {
    "beta": ("losses.jsd.beta",),
    "skew": ("losses.skl.skew", "losses.srkl.skew"),
    "correct_prob": ("losses.tfkd.correct_prob",),
    "ema_decay": ("pseudo_teachers.ema.decay",),
    "augment_prob": ("pseudo_teachers.augment.prob",),
    "num_peers": ("pseudo_teachers.peers.count",),
    "peer_teacher_weight": ("pseudo_teachers.peers.teacher_weight",),
    "pseudo_top_k": ("pseudo_teachers.{pseudo_teacher}.top_k",),
}


@dataclass
class StudentConfig:
    path: str = doc("Student to start from: a local save_pretrained folder or a hub id. Empty: build from the spec below.", "")
    arch: str = doc("Architecture of a student built from a spec (see kdcache.train.student.STUDENT_ARCHS).", "llama")
    hidden_size: int = doc("Spec: model width.", 128, valid=POSITIVE)
    num_layers: int = doc("Spec: transformer blocks.", 4, valid=POSITIVE)
    num_heads: int = doc("Spec: attention heads.", 4, valid=POSITIVE)
    num_kv_heads: int = doc("Spec: key/value heads (grouped-query attention).", 2, valid=POSITIVE)
    intermediate_size: int = doc("Spec: MLP width.", 384, valid=POSITIVE)
    max_position_embeddings: int = doc("Spec: longest sequence.", 2048, valid=at_least(2))
    tie_embeddings: bool = doc("Spec: share input and output embeddings.", True)
    tokenizer: str = doc("Spec: tokenizer folder; empty uses the copy stored in the cache.", "")
    trust_remote_code: bool = doc("Allow model code from the student folder/hub.", False)
    allow_pickle_weights: bool = doc(
        "Allow student weights stored as pickle (pytorch_model.bin, .pt), which can run code when loaded; off: safetensors only.", False)
    attention_dropout: float = doc("Spec: dropout on attention probabilities (the dropout pseudo-teacher needs it > 0).", 0.0, valid=Valid(0, 1, hi_open=True))

    def __post_init__(self):
        check_fields(self)
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"student.hidden_size ({self.hidden_size}) must be a multiple of student.num_heads ({self.num_heads}) and "
                f"num_heads of student.num_kv_heads ({self.num_kv_heads}); e.g. --set student.num_heads=4 --set student.num_kv_heads=2"
            )


@dataclass
class StageConfig:
    """One stage of a stage-wise run: its steps and what changes in it (kdcache/train/objective.py)."""

    steps: int = doc("Optimizer steps of this stage; 0 in the last stage: until the run's `steps`.", 0, valid=NON_NEGATIVE)
    loss: str = doc("This stage's logit loss (none: terms only); empty keeps the run's `loss`.", "")
    alpha: float | None = doc("This stage's constant alpha; null keeps the run's alpha and its schedule.", None, valid=FRACTION)
    terms: dict | None = doc("This stage's loss terms, replacing the run's `terms` (e.g. {hidden: {weight: 1, mapping: [[2, 15]]}}); null keeps them.", None)
    freeze: list[str] = doc("Student parameters not updated in this stage: glob patterns over parameter names "
                            "(a module name freezes all of its parameters), e.g. [model.embed_tokens, model.layers.0].", default_factory=list)


@dataclass
class DistributedConfig:
    """Data-parallel training under torchrun (kdcache/train/distributed.py); its own section, `distributed.*`."""

    strategy: Literal["ddp", "fsdp"] = doc(
        "How the ranks of a torchrun launch share the student: ddp (a full copy per rank, gradients summed across ranks); "
        "fsdp (FSDP2 fully_shard per decoder block: parameters, gradients and optimizer moments split across the ranks, "
        "for students that do not fit one device; a logit loss only: terms, stages, packing and pseudo-teachers are refused). "
        "Ignored by a single-process run.", "ddp")
    backend: Literal["auto", "gloo", "nccl"] = doc("torch.distributed backend; auto: nccl on CUDA devices, gloo on CPU.", "auto")

    def __post_init__(self):
        check_fields(self)


@dataclass
class TrainConfig:
    cache: str = doc("Cache directory written by `kdcache generate`.", "")
    out: str = doc("Run directory: checkpoints, final model, metrics.", "")
    student: StudentConfig = doc("The student model.", default_factory=StudentConfig)
    loss: str = doc("Logit loss (registry in kdcache.train.losses): ce; kd (forward KL, fused fast path); the divergences fkl, rkl, jsd, skl, srkl, tv; rskd (sampled sparse targets); tfkd (teacher-free virtual teacher); none (terms only).", "kd")
    terms: dict = doc(
        "Loss terms added to the logit loss, each a weight or its own section (registry in kdcache.train.terms): "
        "hidden (feature KD), attention (MiniLMv2 relations), exits (layer-wise self-distillation); "
        "e.g. {hidden: {weight: 0.5, metric: cosine}} or --set terms.hidden=0.5. `kdcache fields train` lists each term's keys.",
        default_factory=dict)
    stages: list[StageConfig] = doc(
        "Stage-wise training: a list of stages, each with its steps, loss, alpha, terms and frozen modules, switched at step "
        "boundaries (empty: one stage).", default_factory=list)
    alpha: float = doc("Weight of the soft KD term; 1 - alpha weights hard-label cross-entropy (the start value under a schedule).", 0.5, valid=FRACTION)
    alpha_schedule: Literal["constant", "linear", "cosine"] = doc("How alpha moves from `alpha` (step 0) to `alpha_end` (last step).", "constant")
    alpha_end: float | None = doc("Final alpha of a linear/cosine schedule (null: stay at alpha).", None, valid=FRACTION)
    temperature: float = doc("Softmax temperature of the KD term (the loss is scaled by T^2).", 1.0, valid=POSITIVE)
    tail: Literal["bucket", "renormalize"] = doc("Mass outside the cached top-k: one extra bucket, or drop it and renormalise.", "bucket")
    tempered_tail: Literal["auto", "exact", "bucket"] = doc(
        "The teacher's tail bucket at temperature != 1 (tail: bucket): exact uses the tail mass the cache stores for "
        "this temperature (generate --tail-temperatures), so KD equals dense tempered KD bucketed; bucket tempers the "
        "k+1 buckets of both sides as if they were k+1 tokens (a consistent approximation); auto: exact when the "
        "cache has it, else bucket. Both keep the teacher as the optimum. Pseudo-teachers compute the exact tail themselves "
        "unless this is bucket.", "auto")
    losses: dict = doc(
        "Parameters of the logit losses, one section per loss name (each loss's keys are its own, registry in "
        "kdcache.train.losses), e.g. {jsd: {beta: 0.3}} or --set losses.jsd.beta=0.3; only the sections of the losses the "
        "run uses (loss, stages[i].loss) are parsed and range-checked, the others' names and keys are checked. "
        "`kdcache fields train` lists every loss's keys.", default_factory=dict)
    pseudo_teacher: str = doc(
        "Teacher-free targets from the student itself (registry in kdcache.train.pseudo_teachers): ema (a moving average "
        "of its weights), augment (its own predictions on clean tokens teach it on corrupted ones), dropout (its own "
        "predictions under another dropout mask; needs student.attention_dropout > 0), peers (pseudo_teachers.peers.count "
        "students trained together, each taught by the pooled prediction of the others); none: the cache's teacher. "
        "Replaces the cache's top-k; any divergence loss.", "none")
    pseudo_teachers: dict = doc(
        "Parameters of the pseudo-teachers, one section per name: ema {decay}, augment {prob}, peers {count, teacher_weight}, "
        "and top_k in each; e.g. {ema: {decay: 0.999}} or --set pseudo_teachers.ema.decay=0.999; only the section of the "
        "run's pseudo_teacher is parsed and range-checked, the others' names and keys are checked.", default_factory=dict)
    curriculum: CurriculumConfig = doc(
        "Curriculum by the teacher's per-example difficulty (curriculum.by=teacher_nll): the easiest fraction first, "
        "growing by a pacing function to every example (kdcache/train/curriculum.py).", default_factory=CurriculumConfig)
    distributed: DistributedConfig = doc(
        "Training under `torchrun --nproc-per-node N -m kdcache train ...` (kdcache/train/distributed.py): each rank "
        "trains on every N-th example, so one step sees batch_size x grad_accum x N examples.", default_factory=DistributedConfig)
    steps: int = doc("Optimizer steps.", 300, valid=POSITIVE)
    batch_size: int = doc("Examples per micro-batch.", 8, valid=POSITIVE)
    grad_accum: int = doc("Micro-batches per optimizer step.", 1, valid=POSITIVE)
    packing: bool = doc(
        "Sequence packing: lay each micro-batch's batch_size examples end to end in as few rows as fit (rows as long as "
        "its longest example, first-fit longest first) instead of padding every example to it, so short examples stop "
        "paying for padding (a gain where lengths vary: examples longer than half the row never share one). Each example keeps its own positions (from 0) and attends only to itself, and no target "
        "crosses into the next example: the logits, the losses' per-target order and their normalisation (by target "
        "tokens) are the padded batch's, so a packed run sees the same examples per step and follows the padded run's "
        "loss curve. Every logit loss, terms hidden and exits, pseudo-teachers ema, dropout and peers; refused with "
        "terms.attention and pseudo_teacher augment (they read whole padded rows). Evaluation stays padded "
        "(kdcache/train/packing.py).", False)
    lr: float = doc("Peak learning rate (AdamW).", 3e-3, valid=POSITIVE)
    min_lr_ratio: float = doc("Final learning rate as a fraction of the peak (cosine decay).", 0.1, valid=FRACTION)
    warmup_steps: int = doc("Linear warm-up steps.", 20, valid=NON_NEGATIVE)
    weight_decay: float = doc("AdamW weight decay (matrices only).", 0.1, valid=NON_NEGATIVE)
    grad_clip: float = doc("Clip the global gradient norm to this (0 disables).", 1.0, valid=NON_NEGATIVE)
    precision: Literal["auto", "fp32", "bf16"] = doc("auto: bf16 autocast on CUDA with bf16 support, fp32 elsewhere.", "auto")
    device: str = doc("auto, cpu, cuda, cuda:N.", "auto")
    seed: int = doc("Seed for student init and data order.", 0)
    eval_fraction: float = doc("Examples held out from training for evaluation (stable split by example_id).", 0.05, valid=Valid(0, 1, hi_open=True))
    eval_cache: str = doc(
        "Evaluate on this cache's held-out split instead of `cache`'s (every row if eval_fraction is 0), e.g. the real text "
        "when training on teacher continuations; made from the same dataset rows, the split keeps them out of training.",
        "",
    )
    eval_max_examples: int = doc("Cap on held-out examples evaluated.", 256, valid=POSITIVE)
    eval_every: int = doc("Evaluate every N steps (0: only at the end).", 100, valid=NON_NEGATIVE)
    log_every: int = doc("Log training metrics every N steps.", 10, valid=POSITIVE)
    save_every: int = doc("Checkpoint every N steps (0: only at the end).", 100, valid=NON_NEGATIVE)
    keep_checkpoints: int = doc("Checkpoints to keep (oldest removed once a newer one is on disk); resuming reads only the latest.", 1, valid=POSITIVE)
    shuffle_window: int = doc("Row groups shuffled together (memory grows with it).", 4, valid=POSITIVE)
    prefetch: int = doc("Micro-batches read, decoded and collated ahead in a background thread, so the step never waits "
                        "for the cache (0: in the step's thread). Changes no result.", 2, valid=NON_NEGATIVE)
    topk_decode: Literal["auto", "host", "device"] = doc(
        "Where a coded (sqrt-delta) cache's top-k is decoded: host (numpy, in the reader's thread), device (torch, after "
        "the codes are copied: half the bytes to move, and the host's largest read cost moves to the GPU), auto: device "
        "on CUDA, host otherwise. Results differ by float32 rounding at most; a lists cache has nothing to decode.", "auto")
    report_to: list[str] = doc(
        "Where metric rows go besides RUN/metrics.jsonl (always written): tensorboard (RUN/tensorboard/, train rows as "
        "train/FIELD and eval rows as eval/FIELD scalars by step; needs `pip install 'kdcache[tensorboard]'`). "
        "kdcache/train/reporting.py.", default_factory=list)
    resume: bool = doc("Continue from the latest checkpoint in `out` even if the config changed (e.g. more steps).", False)
    overwrite: bool = doc("Start over, deleting an earlier run in `out`.", False)

    @staticmethod
    def upgrade_keys(data: dict, where: str = "", warn: bool = True) -> dict:
        """``data`` (a train section) with the flat keys of earlier versions moved into their sections (LEGACY_KEYS).
        Giving an old key and its new one with different values is refused."""
        old = [k for k in LEGACY_KEYS if k in data]
        if not old:
            return data
        prefix = f"{where}." if where else ""
        out = {k: v for k, v in data.items() if k not in LEGACY_KEYS}
        for top in ("losses", "pseudo_teachers"):  # copies: the caller's mapping is left as it was
            if isinstance(out.get(top), dict):
                out[top] = {name: dict(sec) if isinstance(sec, dict) else sec for name, sec in out[top].items()}
        pseudo = str(data.get("pseudo_teacher", "none"))
        moved = []
        for key in old:
            targets = [t.format(pseudo_teacher=pseudo) for t in LEGACY_KEYS[key] if pseudo != "none" or "{" not in t]
            moved.append(f"{prefix}{key} is deprecated: use {' and '.join(prefix + t for t in LEGACY_KEYS[key])}"
                         .replace("{pseudo_teacher}", pseudo if pseudo != "none" else "NAME")
                         + ("" if targets else f" (it has no effect with {prefix}pseudo_teacher none)"))
            for target in targets:
                top, name, field = target.split(".")
                sections = out.setdefault(top, {})
                if not isinstance(sections, dict) or not isinstance(sections.setdefault(name, {}), dict):
                    raise ConfigError(f"{prefix}{top}.{name} must be a mapping of its keys (e.g. {prefix}{target}), "
                                      f"got {show(sections.get(name) if isinstance(sections, dict) else sections)}")
                section = sections[name]
                if field in section and section[field] != data[key]:
                    raise ConfigError(f"{prefix}{key} ({show(data[key])}) and {prefix}{target} ({show(section[field])}) disagree; "
                                      f"{prefix}{key} is deprecated: drop it and keep {prefix}{target}")
                section[field] = data[key]
        if warn:
            log.warning("; ".join(moved))
        return out

    def used_losses(self) -> list[str]:
        """The logit losses this run computes: its ``loss`` and every stage's, in order (none excluded)."""
        names = [self.loss, *(st.loss for st in self.stages if st.loss)]
        return [n for i, n in enumerate(names) if n != "none" and n not in names[:i]]

    def __post_init__(self):
        typed_sections(self)
        check_fields(self)
        # the sections' names, keys and values are checked by their registries, which import torch, when the run
        # starts (kdcache.train.losses.loss_options, kdcache.train.pseudo_teachers.pseudo_teacher_options)
        for key in ("losses", "pseudo_teachers"):
            sections = getattr(self, key)
            if not isinstance(sections, dict):
                raise ConfigError(f"{key} must be a mapping of names to their sections, got {show(sections)}")
            for name, sec in sections.items():
                if not (sec is None or isinstance(sec, dict) or hasattr(sec, "__dataclass_fields__")):
                    raise ConfigError(f"{key}.{name} must be a mapping of its keys, got {show(sec)} (e.g. --set {key}.{name}.KEY=VALUE; "
                                      "`kdcache fields train` lists them)")
        if self.alpha_schedule != "constant" and self.alpha_end is None:
            raise ConfigError(f"alpha_schedule {self.alpha_schedule} needs alpha_end (the value at the last step): --set alpha_end=0.3")
        if self.resume and self.overwrite:
            raise ConfigError("pass either --resume or --overwrite, not both")

    def validate(self) -> None:
        if not self.cache:
            raise ConfigError("no cache given; pass --cache DIR (written by `kdcache generate`)")
        if not self.out:
            raise ConfigError("no run directory given; pass --out DIR")
        if is_remote(self.out):  # the cache may be on an object store; checkpoints are renamed and fsynced in place
            raise ConfigError(f"--out {self.out} is on an object store; a training run's folder must be local (the cache may be remote): "
                              "pass a local --out and copy RUN/final up when it is done")
        if self.student.path:
            check_model_folder(self.student.path, "student", "--student")
        from kdcache.train.reporting import check_report_to  # torch-free: a missing tensorboard costs a second

        check_report_to(self.report_to)

