"""The transformers encoder teacher: any transformers text model by task, not only causal LMs.

``--backend transformers-encoder`` loads a sequence classifier (``*ForSequenceClassification``: its class
logits become the example-level ``class_logits`` column, its labels ``signals.classes``) or, for any other
model, the bare encoder (``AutoModel``: feature extraction). Either way the chosen layers' hidden states
can be stored per token (``hidden_layers``) or pooled per example (``pooled_layers``). Such a teacher has
no next-token distribution, so top-k, sampled targets, continuations and tail temperatures are refused in
one line; per-example ``teacher_entropy`` is the entropy of its class distribution (NaN without classes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdcache.errors import ConfigError
from kdcache.pipeline.teachers.base import register_backend
from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher
from kdcache.weights import load_error


class EncoderTeacher(TransformersTeacher):
    entropy_kind = "classes"

    @property
    def classifies(self) -> bool:
        return any(a.endswith("ForSequenceClassification") for a in (self.config.architectures or []))

    def classes(self) -> list[str] | None:
        """The classifier's labels in logit order (None for a bare encoder)."""
        if not self.classifies:
            return None
        return [str(self.config.id2label[i]) for i in range(int(self.config.num_labels))]

    def identity(self) -> dict:
        return {**super().identity(), "backend": "transformers-encoder"}

    def _architecture(self) -> str:
        return (self.config.architectures or [type(self.config).__name__])[0]

    def describe_attention(self, blocks: list[int]) -> dict:
        raise ConfigError("attention_layers need a Llama-style causal teacher; drop attention_layers for --backend transformers-encoder")

    def load(self) -> None:
        from transformers import AutoModel, AutoModelForSequenceClassification

        if self.model is not None:
            return
        cls = AutoModelForSequenceClassification if self.classifies else AutoModel
        try:
            model = cls.from_pretrained(self.folder, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                                        use_safetensors=None if self.allow_pickle_weights else True)
        except (OSError, ValueError) as exc:
            raise load_error("teacher", self.model_name, exc, self.allow_pickle_weights, "allow_pickle_weights") from None
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def score(self, sequences: list[np.ndarray], top_k: int, hidden_layers: list[int], sampling=None, seeds=None) -> list[dict]:
        assert self.model is not None, "call load() first"
        pad = self.config.pad_token_id
        if pad is None and len(sequences) > 1:
            # A decoder-style classifier reads the last non-pad token, which it cannot find without a pad id: one row
            # at a time, so no row is ever scored at a padding position.
            return [r for s in sequences for r in self.score([s], top_k, hidden_layers)]
        ids, attn, _, lens = self._pad(sequences)
        if pad is not None:
            ids = ids.masked_fill(attn == 0, int(pad))
        out = self.model(input_ids=ids, attention_mask=attn, output_hidden_states=bool(hidden_layers))
        results: list[dict[str, Any]] = [{} for _ in sequences]
        if hidden_layers:
            self._add_hidden(results, {layer: out.hidden_states[layer] for layer in hidden_layers}, lens)
        if self.classifies:
            logits = out.logits.float()
            logp = logits.log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            for r, z, h in zip(results, logits.cpu().numpy(), entropy.cpu().numpy()):
                r["class_logits"] = z
                r["class_entropy"] = float(h)
        return results

    def generate(self, prompts, cfg, seeds, max_length=None):
        raise ConfigError("an encoder teacher writes no continuations; drop generation.enabled for --backend transformers-encoder")


def check_encoder_settings(cfg: Any) -> None:
    """What an encoder teacher cannot give, refused before it loads."""
    asked = [name for name, on in (("--top-k K (use --top-k 0)", cfg.top_k), ("--sampled-tokens", cfg.sampled_tokens),
                                   ("--tail-temperatures", cfg.tail_temperatures), ("generation.enabled", cfg.generation.enabled), ("--context (not yet for encoder teachers)", cfg.context)) if on]
    if asked:
        raise ConfigError(f"--backend transformers-encoder has no next-token distribution: drop {', '.join(asked)}; it stores "
                          "class_logits (sequence classifiers), hidden_layers and pooled_layers")


@register_backend("transformers-encoder")
def _from_config(cfg: Any) -> EncoderTeacher:
    check_encoder_settings(cfg)
    teacher = EncoderTeacher(cfg.teacher, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                             allow_pickle_weights=cfg.allow_pickle_weights)
    if not teacher.classifies and not (cfg.pooled_layers or cfg.hidden_layers):
        raise ConfigError(f"{cfg.teacher} is an encoder without classes: nothing to store; pass --set pooled_layers=[-1] "
                          "and/or --hidden-layers L,...")
    return teacher
