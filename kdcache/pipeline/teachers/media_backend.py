"""Image and audio teachers: a transformers model of another modality teaching a student that reads the row's text.

``--backend transformers-vision`` loads any transformers image model from a folder (``AutoImageProcessor`` +
``AutoModelForImageClassification`` when the config names a ``*ForImageClassification`` architecture, else the
bare ``AutoModel``: ViT, DeiT, CLIP's or SigLIP's vision tower, ...); ``--backend transformers-audio`` an audio
model (``AutoFeatureExtractor`` + ``AutoModelForAudioClassification`` or ``AutoModel``: wav2vec 2.0, HuBERT,
AST, ...) reading PCM WAV files at the extractor's sampling rate (stdlib ``wave``; no resampling: files at
another rate are refused). Each row's file (``media.field``, a path inside ``media.root``) is what the teacher
reads; the row's text, tokenized by ``media.tokenizer``, is what the student reads, so a cache pairs the two
(e.g. ``kdcache render-text`` rows). Example-level signals only: the pooled states of chosen layers
(``pooled_layers``: the mean over the image's patches or the clip's frames) and a classifier's ``class_logits``,
which `kdcache classify` students learn through a head. Per-token signals (top-k, hidden states per position)
would have no student token to sit at, so they are refused in one line.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from kdcache.errors import ConfigError, DataError, KDCacheError
from kdcache.fingerprint import json_hash, tree_fingerprint
from kdcache.locations import path_inside
from kdcache.modeling import resolve_device
from kdcache.pipeline.teachers.base import ScoreRequest, Teacher, register_backend
from kdcache.pipeline.teachers.transformers_backend import load_tokenizer, resolve_dtype
from kdcache.weights import load_error, refuse_pickle_only


@dataclass(frozen=True)
class Modality:
    backend: str
    default_field: str
    classifier_suffix: str  # of the architectures whose head gives class logits
    processor: str  # transformers Auto class of the preprocessor
    classifier: str  # transformers Auto class of the classifier
    batched: bool  # several examples per forward (images); audio clips of different lengths go one at a time
    units: str  # what the pooled mean runs over


MODALITIES = {
    "image": Modality("transformers-vision", "image", "ForImageClassification", "AutoImageProcessor", "AutoModelForImageClassification",
                      True, "patches"),
    "audio": Modality("transformers-audio", "audio", "ForSequenceClassification", "AutoFeatureExtractor", "AutoModelForAudioClassification",
                      False, "frames"),
}


class MediaTeacher(Teacher):
    entropy_kind = "classes"

    def __init__(self, cfg: Any, modality: Modality):
        from transformers import AutoConfig

        v, self.modality = cfg.media, modality
        if not v.tokenizer:
            raise ConfigError(f"--backend {modality.backend} reads {modality.default_field} files; the student reads the row's text: "
                              "pass --set media.tokenizer=FOLDER (the student's tokenizer)")
        self.folder = str(Path(cfg.teacher).expanduser())
        if not Path(self.folder, "config.json").is_file():
            raise ConfigError(f"--backend {modality.backend}: {cfg.teacher} is not a model folder with a config.json")
        if not cfg.allow_pickle_weights:
            refuse_pickle_only(self.folder, "teacher", "allow_pickle_weights")
        self.model_name, self.allow_pickle_weights = cfg.teacher, cfg.allow_pickle_weights
        self.field, self.root = v.field or modality.default_field, Path(v.root or ".").expanduser().resolve()
        self.input_fields = (self.field,)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        try:
            self.config = AutoConfig.from_pretrained(self.folder)
        except (OSError, ValueError) as exc:
            raise KDCacheError(f"cannot load teacher config from {cfg.teacher}: {str(exc).splitlines()[0][:200]}") from None
        self.tokenizer = load_tokenizer(v.tokenizer)
        self.model: Any = None
        self.processor: Any = None

    @property
    def classifies(self) -> bool:
        return any(a.endswith(self.modality.classifier_suffix) for a in (self.config.architectures or []))

    def classes(self) -> list[str] | None:
        return [str(self.config.id2label[i]) for i in range(int(self.config.num_labels))] if self.classifies else None

    def _tower_config(self):
        return getattr(self.config, "vision_config", None) or getattr(self.config, "audio_config", None) or self.config

    def identity(self) -> dict:
        cfg = self.config.to_dict()
        for key in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
            cfg.pop(key, None)
        return {"name": self.model_name, "path": str(Path(self.folder).resolve()), "backend": self.modality.backend,
                "architecture": (self.config.architectures or [type(self.config).__name__])[0], "config_hash": json_hash(cfg),
                "weights_fingerprint": tree_fingerprint(self.folder, (".safetensors", ".bin"), sampled=True),
                "dtype": str(self.dtype).replace("torch.", ""), "input_field": self.field}

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)  # the student's text vocabulary: this teacher has no next-token distribution

    @property
    def num_layers(self) -> int:
        return int(self._tower_config().num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self._tower_config().hidden_size)

    def describe_layers(self, layers: list[int]) -> dict[str, str]:
        return {str(layer): "input embeddings" if layer == 0 else f"output of block {layer}" for layer in layers}

    def load(self) -> None:
        import transformers

        if self.model is not None:
            return
        try:
            self.processor = getattr(transformers, self.modality.processor).from_pretrained(self.folder)
            cls = getattr(transformers, self.modality.classifier if self.classifies else "AutoModel")
            model = cls.from_pretrained(self.folder, dtype=self.dtype, use_safetensors=None if self.allow_pickle_weights else True)
        except (OSError, ValueError) as exc:
            raise load_error("teacher", self.model_name, exc, self.allow_pickle_weights, "allow_pickle_weights") from None
        if not self.classifies:
            model = getattr(model, "vision_model", None) or getattr(model, "audio_model", None) or model  # a CLIP-like checkpoint's tower
        self.model = model.to(self.device).eval()

    def _inputs(self, relatives: list) -> dict:
        """The model's input tensors for these files (images: one batch; audio: one clip)."""
        paths = [path_inside(self.root, r, "media.root") for r in relatives]
        try:
            if self.modality.default_field == "image":
                from PIL import Image

                images = []
                for p in paths:
                    with Image.open(p) as im:
                        images.append(im.convert("RGB"))
                return dict(self.processor(images=images, return_tensors="pt"))
            rate = int(self.processor.sampling_rate)
            return dict(self.processor([read_wav(p, rate) for p in paths], sampling_rate=rate, return_tensors="pt"))
        except (OSError, ValueError, EOFError, wave.Error) as exc:
            raise DataError(f"cannot read {self.modality.default_field} file {paths[0] if len(paths) == 1 else paths}: {exc}; fix the file or the row") from None

    @torch.inference_mode()
    def score_files(self, inputs: list[dict], hidden_layers: list[int]) -> list[dict]:
        assert self.model is not None, "call load() first"
        if not self.modality.batched and len(inputs) > 1:
            return [r for i in inputs for r in self.score_files([i], hidden_layers)]
        tensors = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                   for k, v in self._inputs([i[self.field] for i in inputs]).items()}
        out = self.model(**tensors, output_hidden_states=True)
        results: list[dict] = [{} for _ in inputs]
        for layer in hidden_layers:
            hs = out.hidden_states[layer].float().cpu().numpy()
            for r, h in zip(results, hs):
                r[f"hidden_{layer}"] = h  # [patches or frames, H]: pooled into one vector per example by generate
        if self.classifies:
            logp = out.logits.float().log_softmax(-1)
            for r, z, h in zip(results, out.logits.float().cpu().numpy(), (-(logp.exp() * logp).sum(-1)).cpu().numpy()):
                r["class_logits"], r["class_entropy"] = z, float(h)
        return results

    def run(self, requests: Iterable, top_k: int, hidden_layers: list[int], sampling=None) -> Iterator[list]:
        for req in requests:
            if not isinstance(req, ScoreRequest):
                raise ConfigError(f"--backend {self.modality.backend} writes no continuations; drop generation.enabled")
            yield self.score_files(req.inputs or [], hidden_layers) if req.sequences else []

    def score(self, sequences, top_k, hidden_layers, sampling=None, seeds=None):
        raise ConfigError(f"--backend {self.modality.backend} scores files, not token sequences (generate passes it each row's file)")

    def generate(self, prompts, cfg, seeds, max_length=None):
        raise ConfigError(f"--backend {self.modality.backend} writes no continuations; drop generation.enabled")


def read_wav(path: Path, rate: int) -> np.ndarray:
    """A PCM WAV file as mono float32 in [-1, 1] (channels averaged); its rate must be the model's (no resampling)."""
    with wave.open(str(path), "rb") as w:
        if w.getframerate() != rate:
            raise ValueError(f"it is sampled at {w.getframerate()} Hz, the model reads {rate} Hz (resample the file)")
        width, channels, frames = w.getsampwidth(), w.getnchannels(), w.readframes(w.getnframes())
    if width not in (1, 2, 4):
        raise ValueError(f"{8 * width}-bit samples; write 8-, 16- or 32-bit PCM")
    x = np.frombuffer(frames, dtype={1: np.uint8, 2: "<i2", 4: "<i4"}[width]).astype(np.float32)
    x = (x - 128) / 128 if width == 1 else x / float(2 ** (8 * width - 1))
    return x.reshape(-1, channels).mean(axis=1)


def check_media_settings(cfg: Any, backend: str) -> None:
    asked = [name for name, on in (("--top-k K (use --top-k 0)", cfg.top_k), ("--sampled-tokens", cfg.sampled_tokens),
                                   ("--tail-temperatures", cfg.tail_temperatures), ("generation.enabled", cfg.generation.enabled),
                                   ("--context", cfg.context), ("--hidden-layers (per-token states; use pooled_layers)", cfg.hidden_layers),
                                   ("attention_layers", cfg.attention_layers)) if on]
    if asked:
        raise ConfigError(f"--backend {backend} stores example-level signals only: drop {', '.join(asked)}; it stores "
                          "pooled_layers (mean over the input's patches or frames) and a classifier's class_logits")
    if cfg.pooling != "mean":
        raise ConfigError(f"--backend {backend} pools over the input's patches or frames: use --set pooling=mean")


def _factory(modality: Modality) -> Callable[[Any], MediaTeacher]:
    def build(cfg: Any) -> MediaTeacher:
        check_media_settings(cfg, modality.backend)
        teacher = MediaTeacher(cfg, modality)
        if not teacher.classifies and not cfg.pooled_layers:
            raise ConfigError(f"{cfg.teacher} is a model without classes: nothing to store; pass --set pooled_layers=[-1]")
        return teacher

    return build


for _modality in MODALITIES.values():
    register_backend(_modality.backend)(_factory(_modality))

