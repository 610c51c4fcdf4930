"""Ensemble targets from several caches: the exact mixture at full vocabulary, mass conservation at k,
clear refusals for incompatible inputs, and training on the result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdcache.cache import open_cache
from kdcache.cache.combine import combine_caches
from kdcache.errors import CacheMismatchError, ConfigError
from kdcache.cli import main
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher


@pytest.fixture(scope="module")
def two_teachers(tiny_teacher, tmp_path_factory):
    """A second tiny teacher: same tokenizer, other weights."""
    from conftest import build_tiny_llama

    from kdcache.pipeline.teachers.transformers_backend import load_tokenizer

    path = tmp_path_factory.mktemp("teacher_b")
    build_tiny_llama(path, load_tokenizer(str(tiny_teacher)), seed=1)
    return tiny_teacher, path


def _cache(teacher, data, out, k):
    generate(GenerateConfig(teacher=str(teacher), out=str(out), top_k=k, logprob_codec="fp32", data=data), progress=False)
    return out


def test_full_vocabulary_mixture_is_exact(two_teachers, text_jsonl, tmp_path):
    a, b = two_teachers
    data = DataConfig(source=str(text_jsonl), max_length=32, max_rows=8)
    V = TransformersTeacher(str(a)).vocab_size
    ca, cb = _cache(a, data, tmp_path / "a", V), _cache(b, data, tmp_path / "b", V)
    m = combine_caches([ca, cb], [3, 7], tmp_path / "mix", top_k=V, logprob_codec="fp32")
    assert m.num_rows == 8 and m.settings["ensemble"][0]["weight"] == pytest.approx(0.3)
    teachers = [TransformersTeacher(str(t), dtype="float32") for t in (a, b)]
    for t in teachers:
        t.load()
    for ex in open_cache(tmp_path / "mix").stream():
        ids = torch.tensor(ex["input_ids"][None].astype(np.int64))
        with torch.no_grad():
            probs = [torch.softmax(t.model(ids).logits[0, :-1].double(), -1) for t in teachers]
        mix = (0.3 * probs[0] + 0.7 * probs[1]).numpy()
        got = np.exp(ex["topk_logprobs"].astype(np.float64))
        # The caches come from padded batched fp32 forwards, the reference from unbatched ones: each log-prob is off by
        # <= 1e-4 (LOGPROB_TOL in test_generate.py: a 64-term fp32 logit contraction, sum |h W| <= 26 for both teachers,
        # 64 * 2^-24 * 26 = 9.9e-5), i.e. each probability by a relative 1e-4, and so is their float64 mixture; storing
        # its log in fp32 adds a relative
        # 2^-24 * |log p| <= 2^-24 * 87.5 (p clipped at 1e-38). An absolute 2e-6 was ~6x the error measured on one CPU.
        # Measured: relative <= 3.4e-6 (AVX-512, AVX2, default kernels; 1 or 2 threads).
        want = np.take_along_axis(mix, ex["topk_ids"].astype(np.int64), 1)
        np.testing.assert_allclose(got, want, rtol=1e-4 + 87.5 * 2.0**-24, atol=0)
        assert np.all(np.diff(got, axis=1) <= 1e-12)  # most likely first
        assert np.all(np.isneginf(ex["tail_logprob"]))


def test_topk_mixture_conserves_mass_and_trains(two_teachers, text_jsonl, tmp_path):
    a, b = two_teachers
    data = DataConfig(source=str(text_jsonl), max_length=32, max_rows=16)
    ca, cb = _cache(a, data, tmp_path / "a", 8), _cache(b, data, tmp_path / "b", 4)
    r = CliRunner().invoke(main, ["combine", str(ca), str(cb), "--weights", "0.5,0.5", "--out", str(tmp_path / "mix")])
    assert r.exit_code == 0, r.output
    cache = open_cache(tmp_path / "mix")
    assert cache.manifest.top_k == 8
    for ex in cache.stream():
        total = np.exp(ex["topk_logprobs"].astype(np.float64)).sum(-1) + np.exp(ex["tail_logprob"].astype(np.float64))
        np.testing.assert_allclose(total, 1.0, atol=5e-3)  # fp16 storage
    from kdcache.train import StudentConfig, TrainConfig, train

    final = train(TrainConfig(cache=str(tmp_path / "mix"), out=str(tmp_path / "run"), loss="kd", steps=3, batch_size=4, eval_every=0, save_every=0,
                              student=StudentConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)), progress=False)
    assert np.isfinite(final["eval_ppl"])


def test_incompatible_inputs_are_refused(two_teachers, tiny_cache, text_jsonl, tmp_path):
    a, _ = two_teachers
    other = _cache(a, DataConfig(source=str(text_jsonl), max_length=32, max_rows=10), tmp_path / "other", 8)
    with pytest.raises(ConfigError, match="non-negative and sum to a positive number"):
        combine_caches([tiny_cache, tiny_cache], [0, 0], tmp_path / "x")
    with pytest.raises(ConfigError, match="non-negative"):
        combine_caches([tiny_cache, tiny_cache], [1, -1], tmp_path / "x")
    with pytest.raises(ConfigError, match="one weight per cache"):
        combine_caches([tiny_cache, tiny_cache], [1], tmp_path / "x")
    with pytest.raises(CacheMismatchError, match="hold different examples"):
        combine_caches([tiny_cache, other], [1, 1], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(main, ["combine", str(tiny_cache), str(tiny_cache), "--weights", "a,b", "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--weights must be comma-separated numbers" in r.output


def test_different_tokenizers_are_refused(tiny_teacher, tiny_cache, text_jsonl, tmp_path):
    from conftest import build_tiny_llama

    from kdcache.pipeline.teachers.transformers_backend import load_tokenizer

    tok = load_tokenizer(str(tiny_teacher))
    tok.add_tokens(["zebra"])  # one more token: another tokenizer and vocabulary
    path = tmp_path / "t2"
    build_tiny_llama(path, tok)
    c2 = _cache(path, DataConfig(source=str(text_jsonl), max_length=64), tmp_path / "c2", 8)
    with pytest.raises(CacheMismatchError, match="different tokenizers"):
        combine_caches([tiny_cache, c2], [1, 1], tmp_path / "x")
    assert not (tmp_path / "x").exists()
