"""Teachers beyond causal LMs (`--backend transformers-encoder`): a sequence classifier's class logits and an
encoder's hidden states in the same cache contract, against the model's own forward (plain transformers), and
a classifier student that learns the teacher's soft labels (`classify --set kd_weight=...`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import build_tiny_tokenizer
from kdcache.cache import holdout_fraction_filter, open_cache, read_manifest, verify_cache
from kdcache.config import build_config
from kdcache.errors import ConfigError
from kdcache.pipeline.generate import generate
from kdcache.train.classify import ClassifyConfig, train_classifier
from test_generate import make_cfg

TINY = {"student.hidden_size": 32, "student.num_layers": 1, "student.num_heads": 2, "student.num_kv_heads": 1, "student.intermediate_size": 64}


def _bert(path, classify: bool):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tok = build_tiny_tokenizer(path)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=128, pad_token_id=tok.pad_token_id, num_labels=2, id2label={0: "other", 1: "file"},
                     label2id={"other": 0, "file": 1})
    torch.manual_seed(3)
    model = (BertForSequenceClassification if classify else BertModel)(cfg)
    with torch.no_grad():  # soft labels that say something: peaky, and not symmetric under swapping the classes
        if classify:
            model.classifier.weight.mul_(20)
            model.classifier.bias.copy_(torch.tensor([1.5, -1.5]))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_classifier(tmp_path_factory):
    return _bert(tmp_path_factory.mktemp("bert_cls"), classify=True)


@pytest.fixture(scope="module")
def bert_encoder(tmp_path_factory):
    return _bert(tmp_path_factory.mktemp("bert_enc"), classify=False)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, text_jsonl):
    rows = [json.loads(line) for line in text_jsonl.read_text().splitlines()]
    path = tmp_path_factory.mktemp("lab") / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"], "label": "file" if "file" in r["text"].split() else "other"}) + "\n" for r in rows))
    return path


def _encoder_cfg(teacher, out, source, **kw):
    return make_cfg(teacher, out, source, backend="transformers-encoder", top_k=0, **kw)


def test_class_logits_and_pooled_states_are_the_classifiers_own_forward(bert_classifier, labelled, tmp_path):
    from transformers import AutoModelForSequenceClassification

    generate(_encoder_cfg(bert_classifier, tmp_path / "c", labelled, pooled_layers=[-1], hidden_layers=[1], hidden_codec="fp32",
                          keep_fields=["label"], batch_tokens=256), progress=False)
    m = read_manifest(tmp_path / "c")
    assert m.signals["classes"]["labels"] == ["other", "file"] and m.teacher["backend"] == "transformers-encoder"
    assert "topk" not in m.signals and m.settings["scoring"]["entropy"] == "classes"
    model = AutoModelForSequenceClassification.from_pretrained(bert_classifier).eval()
    for ex in open_cache(tmp_path / "c"):
        with torch.no_grad():
            out = model(torch.as_tensor(ex["input_ids"], dtype=torch.long)[None], output_hidden_states=True)
        np.testing.assert_allclose(ex["class_logits"], out.logits[0].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ex["pooled_2"], out.hidden_states[2][0].double().mean(0).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ex["hidden_1"], out.hidden_states[1][0].numpy(), atol=1e-5)
        p = out.logits[0].double().softmax(-1)
        assert np.isnan(ex["teacher_nll"]) and ex["teacher_entropy"] == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)
    assert verify_cache(tmp_path / "c", deep=True).ok
    from click.testing import CliRunner

    from kdcache.cli import main

    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "c")])
    assert r.exit_code == 0 and "teacher ppl" not in r.output and "classes: class_logits" in r.output, r.output


def test_a_bare_encoder_stores_hidden_states_and_no_classes(bert_encoder, labelled, tmp_path):
    generate(_encoder_cfg(bert_encoder, tmp_path / "c", labelled, pooled_layers=[-1], data={"max_rows": 6}), progress=False)
    m = read_manifest(tmp_path / "c")
    assert "classes" not in m.signals and "class_logits" not in open_cache(tmp_path / "c").columns
    assert m.teacher["architecture"] == "BertModel" and all(np.isnan(ex["teacher_entropy"]) for ex in open_cache(tmp_path / "c"))


@pytest.mark.parametrize("kw,words", [
    ({"top_k": 8}, ["no next-token distribution", "--top-k"]),
    ({"sampled_tokens": 4}, ["--sampled-tokens"]),
    ({"context": "x"}, ["--context"]),
    ({"attention_layers": [1]}, ["attention_layers need a Llama-style"]),
])
def test_what_an_encoder_cannot_give_is_refused_before_it_loads(bert_classifier, labelled, tmp_path, kw, words):
    with pytest.raises(ConfigError) as err:
        generate(make_cfg(bert_classifier, tmp_path / "c", labelled, backend="transformers-encoder", **{"top_k": 0, **kw}), progress=False)
    assert all(w in str(err.value) for w in words), err.value
    assert not (tmp_path / "c").exists()


def _cfg(cache, out, **kw) -> ClassifyConfig:
    values = {"cache": str(cache), "out": str(out), "label_field": "label", "steps": 60, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2,
              "eval_fraction": 0.25, "eval_every": 0, "save_every": 0, "device": "cpu", "teacher_weight": 0.0, **TINY, **kw}
    return build_config(ClassifyConfig, None, values, [])


def test_the_classifier_student_learns_the_teachers_soft_labels(bert_classifier, labelled, tmp_path, one_thread):
    from transformers import AutoModelForSequenceClassification

    generate(_encoder_cfg(bert_classifier, tmp_path / "c", labelled, keep_fields=["label"]), progress=False)
    kl = {}
    held = holdout_fraction_filter(0.25)
    rows = [ex for ex in open_cache(tmp_path / "c") if held(ex["example_id"])]
    for w in (1.0, 0.0):
        train_classifier(_cfg(tmp_path / "c", tmp_path / f"kd{w}", kd_weight=w, temperature=2.0), progress=False)
        student = AutoModelForSequenceClassification.from_pretrained(tmp_path / f"kd{w}" / "final").eval()
        order = [["other", "file"].index(student.config.id2label[i]) for i in range(2)]  # student label i -> teacher class
        total = 0.0
        for ex in rows:  # KL(teacher || student) on held-out rows, from the exported model's plain forward
            with torch.no_grad():
                h = student.model(torch.as_tensor(ex["input_ids"], dtype=torch.long)[None]).last_hidden_state[0, -1]
                s = student.score(h).double().log_softmax(-1)
            t = torch.as_tensor(ex["class_logits"], dtype=torch.float64)[order].log_softmax(-1)
            total += float((t.exp() * (t - s)).sum())
        kl[w] = total / len(rows)
    assert kl[1.0] < 0.7 * kl[0.0], kl


@pytest.mark.parametrize("field,words", [("label", None), ("other_label", ["are not the values of 'other_label'", "does not fit"])])
def test_teacher_classes_must_be_the_labels(bert_classifier, labelled, tmp_path, field, words):
    rows = [json.loads(line) for line in labelled.read_text().splitlines()]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({**r, "other_label": "x" if i % 2 else "y"}) + "\n" for i, r in enumerate(rows)))
    generate(_encoder_cfg(bert_classifier, tmp_path / "c", path, keep_fields=["label", "other_label"], data={"max_rows": 16}), progress=False)
    cfg = _cfg(tmp_path / "c", tmp_path / "r", kd_weight=1.0, label_field=field, steps=2)
    if words is None:
        assert "eval_class_kd" in train_classifier(cfg, progress=False)
        return
    with pytest.raises(ConfigError) as err:
        train_classifier(cfg, progress=False)
    assert all(w in str(err.value) for w in words), err.value
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("pad", [7, None])
def test_a_decoder_classifier_is_scored_at_each_rows_last_token_whatever_the_batch(tmp_path, labelled, pad):
    """A Llama-style classifier reads the last non-pad token: rows batched with longer ones must be scored as alone."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_tiny_tokenizer(tmp_path / "t")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, pad_token_id=pad, num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "t")
    generate(_encoder_cfg(tmp_path / "t", tmp_path / "c", labelled, batch_tokens=4096, data={"max_rows": 12}), progress=False)
    exs = list(open_cache(tmp_path / "c"))
    assert len({len(ex["input_ids"]) for ex in exs}) > 1  # rows of several lengths shared batches
    for ex in exs:
        with torch.no_grad():
            ref = model(torch.as_tensor(ex["input_ids"], dtype=torch.long)[None]).logits[0]
        np.testing.assert_allclose(ex["class_logits"], ref.numpy(), rtol=1e-5, atol=1e-5)


def test_an_encoder_without_classes_or_layers_has_nothing_to_store(bert_encoder, labelled, tmp_path):
    with pytest.raises(ConfigError, match="nothing to store"):
        generate(_encoder_cfg(bert_encoder, tmp_path / "c", labelled), progress=False)
    assert not (tmp_path / "c").exists()
