"""The transformers vision teacher: an image model teaching a student that reads the row's text.

``--backend transformers-vision`` loads any transformers image model from a folder (``AutoImageProcessor`` +
``AutoModelForImageClassification`` when the config names a ``*ForImageClassification`` architecture, else the
bare ``AutoModel``: ViT, DeiT, CLIP's or SigLIP's vision tower, ...). Each row's image file (``vision.image_field``,
a path inside ``vision.root``) is what the teacher reads; the row's text, tokenized by ``vision.tokenizer``, is
what the student reads, so a cache pairs the two (e.g. ``kdcache render-text`` rows). It stores example-level
signals only: the pooled states of chosen layers (``pooled_layers``; the mean over the image's patches) and a
classifier's ``class_logits``, which `kdcache classify` students learn through a head. Per-token signals (top-k,
hidden states per position) would have no student token to sit at, so they are refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from kdcache.errors import ConfigError, DataError, KDCacheError
from kdcache.fingerprint import json_hash, tree_fingerprint
from kdcache.modeling import resolve_device
from kdcache.pipeline.teachers.base import ScoreRequest, Teacher, register_backend
from kdcache.pipeline.teachers.transformers_backend import load_tokenizer, resolve_dtype
from kdcache.weights import load_error, refuse_pickle_only


class VisionTeacher(Teacher):
    entropy_kind = "classes"

    def __init__(self, cfg: Any):
        from transformers import AutoConfig

        v = cfg.vision
        if not v.tokenizer:
            raise ConfigError("--backend transformers-vision reads images; the student reads the row's text: pass --set "
                              "vision.tokenizer=FOLDER (the student's tokenizer)")
        self.folder = str(Path(cfg.teacher).expanduser())
        if not Path(self.folder, "config.json").is_file():
            raise ConfigError(f"--backend transformers-vision: {cfg.teacher} is not a model folder with a config.json")
        if not cfg.allow_pickle_weights:
            refuse_pickle_only(self.folder, "teacher", "allow_pickle_weights")
        self.model_name, self.allow_pickle_weights = cfg.teacher, cfg.allow_pickle_weights
        self.image_field, self.root = v.image_field, Path(v.root or ".").expanduser().resolve()
        self.input_fields = (v.image_field,)
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
        return any(a.endswith("ForImageClassification") for a in (self.config.architectures or []))

    def classes(self) -> list[str] | None:
        return [str(self.config.id2label[i]) for i in range(int(self.config.num_labels))] if self.classifies else None

    def _vision_config(self):
        return getattr(self.config, "vision_config", None) or self.config

    def identity(self) -> dict:
        cfg = self.config.to_dict()
        for key in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
            cfg.pop(key, None)
        return {"name": self.model_name, "path": str(Path(self.folder).resolve()), "backend": "transformers-vision",
                "architecture": (self.config.architectures or [type(self.config).__name__])[0], "config_hash": json_hash(cfg),
                "weights_fingerprint": tree_fingerprint(self.folder, (".safetensors", ".bin"), sampled=True),
                "dtype": str(self.dtype).replace("torch.", ""), "image_field": self.image_field}

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)  # the student's text vocabulary: the vision teacher has no next-token distribution

    @property
    def num_layers(self) -> int:
        return int(self._vision_config().num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self._vision_config().hidden_size)

    def describe_layers(self, layers: list[int]) -> dict[str, str]:
        return {str(layer): "patch embeddings" if layer == 0 else f"output of vision block {layer}" for layer in layers}

    def load(self) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

        if self.model is not None:
            return
        try:
            self.processor = AutoImageProcessor.from_pretrained(self.folder)
            cls = AutoModelForImageClassification if self.classifies else AutoModel
            model = cls.from_pretrained(self.folder, dtype=self.dtype, use_safetensors=None if self.allow_pickle_weights else True)
        except (OSError, ValueError) as exc:
            raise load_error("teacher", self.model_name, exc, self.allow_pickle_weights, "allow_pickle_weights") from None
        if not self.classifies:
            model = getattr(model, "vision_model", None) or model  # a CLIP/SigLIP checkpoint: its vision tower
        self.model = model.to(self.device).eval()

    def _image(self, relative: Any):
        from PIL import Image

        if not isinstance(relative, str) or not relative:
            raise DataError(f"field {self.image_field!r} must be an image path, got {relative!r}")
        path = (self.root / relative).resolve()
        if Path(relative).is_absolute() or not path.is_relative_to(self.root):
            raise DataError(f"image path {relative!r} leaves vision.root {self.root}; image paths are relative and stay inside it")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {exc}; fix the file or the row") from None

    @torch.inference_mode()
    def score_images(self, inputs: list[dict], hidden_layers: list[int]) -> list[dict]:
        assert self.model is not None, "call load() first"
        pixels = self.processor(images=[self._image(i[self.image_field]) for i in inputs], return_tensors="pt")["pixel_values"]
        out = self.model(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True)
        results: list[dict] = [{} for _ in inputs]
        for layer in hidden_layers:
            hs = out.hidden_states[layer].float().cpu().numpy()
            for r, h in zip(results, hs):
                r[f"hidden_{layer}"] = h  # [patches (+ CLS), H]: pooled into one vector per example by generate
        if self.classifies:
            logp = out.logits.float().log_softmax(-1)
            for r, z, h in zip(results, out.logits.float().cpu().numpy(), (-(logp.exp() * logp).sum(-1)).cpu().numpy()):
                r["class_logits"], r["class_entropy"] = z, float(h)
        return results

    def run(self, requests: Iterable, top_k: int, hidden_layers: list[int], sampling=None) -> Iterator[list]:
        for req in requests:
            if not isinstance(req, ScoreRequest):
                raise ConfigError("a vision teacher writes no continuations; drop generation.enabled")
            yield self.score_images(req.inputs or [], hidden_layers) if req.sequences else []

    def score(self, sequences, top_k, hidden_layers, sampling=None, seeds=None):
        raise ConfigError("a vision teacher scores images, not token sequences (generate passes it each row's image)")

    def generate(self, prompts, cfg, seeds, max_length=None):
        raise ConfigError("a vision teacher writes no continuations; drop generation.enabled")


def check_vision_settings(cfg: Any) -> None:
    asked = [name for name, on in (("--top-k K (use --top-k 0)", cfg.top_k), ("--sampled-tokens", cfg.sampled_tokens),
                                   ("--tail-temperatures", cfg.tail_temperatures), ("generation.enabled", cfg.generation.enabled),
                                   ("--context", cfg.context), ("--hidden-layers (per-token states; use pooled_layers)", cfg.hidden_layers),
                                   ("attention_layers", cfg.attention_layers)) if on]
    if asked:
        raise ConfigError(f"--backend transformers-vision stores example-level signals only: drop {', '.join(asked)}; it stores "
                          "pooled_layers (mean over the image's patches) and a classifier's class_logits")
    if cfg.pooling != "mean":
        raise ConfigError("--backend transformers-vision pools over image patches: use --set pooling=mean")


@register_backend("transformers-vision")
def _from_config(cfg: Any) -> VisionTeacher:
    check_vision_settings(cfg)
    teacher = VisionTeacher(cfg)
    if not teacher.classifies and not cfg.pooled_layers:
        raise ConfigError(f"{cfg.teacher} is a vision model without classes: nothing to store; pass --set pooled_layers=[-1]")
    return teacher

