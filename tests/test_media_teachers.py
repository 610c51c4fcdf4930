"""Image and audio teachers (--backend transformers-vision / transformers-audio): each row's file read by a
transformers model of that modality, the row's text tokenized for the student. The cache's pooled states and class
logits equal the model's own forward (plain transformers on the same files, WAVs decoded here with numpy); what it
cannot give is refused in one line before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdcache.cache import open_cache
from kdcache.errors import ConfigError, DataError
from kdcache.pipeline.config import DataConfig, GenerateConfig, MediaConfig
from kdcache.pipeline.generate import generate


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"}, label2id={"cat": 0, "dog": 1, "fox": 2},
                    architectures=["ViTForImageClassification"])
    ViTForImageClassification(cfg).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, text_jsonl):
    from PIL import Image

    root = tmp_path_factory.mktemp("pairs")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    texts = [json.loads(line)["text"] for line in text_jsonl.read_text().splitlines()][:7]
    for i in range(len(texts)):
        Image.fromarray(rng.integers(0, 256, size=(20 + 3 * i, 40, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
    (root / "rows.jsonl").write_text("".join(json.dumps({"text": t, "image": f"img/{i}.png"}) + "\n" for i, t in enumerate(texts)))
    return root


def _cfg(vit, pairs, tiny_teacher, out, backend="transformers-vision", **kw):
    return GenerateConfig(teacher=str(vit), backend=backend, out=str(out), device="cpu", top_k=kw.pop("top_k", 0),
                          pooled_layers=kw.pop("pooled_layers", [1, -1]), batch_tokens=40,
                          media=MediaConfig(root=str(pairs), tokenizer=str(tiny_teacher)),
                          data=DataConfig(source=str(kw.pop("source", pairs / "rows.jsonl"))), **kw)


def test_rows_hold_the_vision_models_own_pooled_states_and_logits(vit, pairs, tiny_teacher, tmp_path):
    from PIL import Image
    from transformers import AutoTokenizer, ViTForImageClassification, ViTImageProcessor

    m = generate(_cfg(vit, pairs, tiny_teacher, tmp_path / "c"), progress=False)
    assert m.signals["classes"]["labels"] == ["cat", "dog", "fox"] and m.teacher["backend"] == "transformers-vision"
    rows = [json.loads(line) for line in (pairs / "rows.jsonl").read_text().splitlines()]
    exs = list(open_cache(tmp_path / "c"))
    assert len(exs) == len(rows)
    model, proc = ViTForImageClassification.from_pretrained(vit).eval(), ViTImageProcessor.from_pretrained(vit)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    for ex, row in zip(exs, rows):
        np.testing.assert_array_equal(ex["input_ids"], tok(row["text"])["input_ids"][:512])  # the student's tokens
        pixels = proc(images=[Image.open(pairs / row["image"]).convert("RGB")], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model(pixel_values=pixels, output_hidden_states=True)
        np.testing.assert_allclose(ex["class_logits"], out.logits[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(ex["pooled_1"], out.hidden_states[1][0].double().mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(ex["pooled_2"], out.hidden_states[2][0].double().mean(0).numpy(), atol=1e-5)
        logp = out.logits[0].log_softmax(-1)
        assert ex["teacher_entropy"] == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-5)


@pytest.mark.parametrize("kw,match", [
    ({"top_k": 4}, "example-level signals only"),
    ({"hidden_layers": [1]}, "pooled_layers"),
    ({"pooling": "last"}, "pooling=mean"),
])
def test_what_a_vision_teacher_cannot_give_is_refused_before_any_work(vit, pairs, tiny_teacher, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        generate(_cfg(vit, pairs, tiny_teacher, tmp_path / "c", **kw), progress=False)
    assert not (tmp_path / "c").exists()


def test_missing_tokenizer_field_or_a_path_outside_root_is_one_line(vit, pairs, tiny_teacher, tmp_path):
    cfg = _cfg(vit, pairs, tiny_teacher, tmp_path / "a")
    cfg.media.tokenizer = ""
    with pytest.raises(ConfigError, match="media.tokenizer"):
        generate(cfg, progress=False)
    cfg = _cfg(vit, pairs, tiny_teacher, tmp_path / "b")
    cfg.media.field = "picture"
    with pytest.raises(ConfigError, match="'picture'"):
        generate(cfg, progress=False)
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"text": "a b c d", "image": "../outside.png"}) + "\n")
    with pytest.raises(DataError, match="leaves media.root"):
        generate(_cfg(vit, pairs, tiny_teacher, tmp_path / "d", source=bad), progress=False)
    assert not any((tmp_path / n).exists() for n in "abd")


# --------------------------------------------------------------------------------------------------
# audio

RATE = 16000


def _write_wav(path, samples: np.ndarray, rate: int = RATE) -> None:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def w2v(tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    folder = tmp_path_factory.mktemp("w2v")
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
                         conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                         num_labels=2, id2label={0: "low", 1: "high"}, label2id={"low": 0, "high": 1},
                         architectures=["Wav2Vec2ForSequenceClassification"])
    Wav2Vec2ForSequenceClassification(cfg).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=RATE, do_normalize=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory, text_jsonl):
    root = tmp_path_factory.mktemp("clips")
    (root / "wav").mkdir()
    texts = [json.loads(line)["text"] for line in text_jsonl.read_text().splitlines()][:5]
    for i in range(len(texts)):  # tones of different pitch and length
        t = np.arange(int(RATE * (0.2 + 0.05 * i))) / RATE
        _write_wav(root / "wav" / f"{i}.wav", 0.5 * np.sin(2 * np.pi * (200 + 150 * i) * t))
    _write_wav(root / "wav" / "fast.wav", np.zeros(800), rate=8000)
    (root / "rows.jsonl").write_text("".join(json.dumps({"text": t, "audio": f"wav/{i}.wav"}) + "\n" for i, t in enumerate(texts)))
    return root


def test_audio_rows_hold_the_models_own_pooled_states_and_logits(w2v, clips, tiny_teacher, tmp_path):
    import wave

    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    m = generate(_cfg(w2v, clips, tiny_teacher, tmp_path / "c", backend="transformers-audio"), progress=False)
    assert m.signals["classes"]["labels"] == ["low", "high"] and m.teacher["backend"] == "transformers-audio"
    rows = [json.loads(line) for line in (clips / "rows.jsonl").read_text().splitlines()]
    exs = list(open_cache(tmp_path / "c"))
    model, fe = Wav2Vec2ForSequenceClassification.from_pretrained(w2v).eval(), Wav2Vec2FeatureExtractor.from_pretrained(w2v)
    for ex, row in zip(exs, rows):
        with wave.open(str(clips / row["audio"]), "rb") as w:
            x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
        with torch.no_grad():
            out = model(**fe(x, sampling_rate=RATE, return_tensors="pt"), output_hidden_states=True)
        np.testing.assert_allclose(ex["class_logits"], out.logits[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(ex["pooled_2"], out.hidden_states[2][0].double().mean(0).numpy(), atol=1e-5)
    assert not np.allclose(exs[0]["pooled_2"], exs[1]["pooled_2"])  # each row its own clip


def test_a_clip_at_another_sampling_rate_is_one_line(w2v, clips, tiny_teacher, tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"text": "a b c d", "audio": "wav/fast.wav"}) + "\n")
    with pytest.raises(DataError, match="8000 Hz, the model reads 16000 Hz"):
        generate(_cfg(w2v, clips, tiny_teacher, tmp_path / "c", backend="transformers-audio", source=bad), progress=False)
    assert not (tmp_path / "c").exists()
