"""The vllm backend against the transformers backend, with real vLLM (vllm-cpu on CPU machines).

Parity is checked tie-aware: a random tiny model has many near-equal log-probabilities, so two exact
engines may order tied tokens differently. What must hold: sorted top-k values agree, every token both
engines keep has the same log-probability, and a token only one engine keeps sits at the k-th value
(a tie at the boundary).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kdcache.cache import MANIFEST_NAME, open_cache
from kdcache.errors import ConfigError, KDCacheError
from kdcache.pipeline.config import DataConfig, GenerateConfig, GenerationConfig, VLLMConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher
from kdcache.pipeline.teachers.vllm_backend import vllm_available

if not vllm_available():
    if os.environ.get("KDCACHE_REQUIRE_VLLM"):
        raise RuntimeError("KDCACHE_REQUIRE_VLLM is set but vLLM is not installed; run `bash scripts/setup.sh --with-vllm`")
    pytest.skip("vLLM is not installed (bash scripts/setup.sh --with-vllm)", allow_module_level=True)

FP32_TOL = 1e-4


def _rows(path) -> dict[str, dict]:
    return {ex["example_id"]: ex for ex in open_cache(path).stream()}


def assert_topk_parity(a: dict, b: dict, k: int, tol: float = FP32_TOL) -> None:
    ia, ib = np.asarray(a["topk_ids"]).reshape(-1, k), np.asarray(b["topk_ids"]).reshape(-1, k)
    va, vb = (np.asarray(x["topk_logprobs"], dtype=np.float64).reshape(-1, k) for x in (a, b))
    np.testing.assert_allclose(va, vb, atol=tol, rtol=0)
    for p in np.flatnonzero((ia != ib).any(-1)):
        da, db = dict(zip(ia[p].tolist(), va[p])), dict(zip(ib[p].tolist(), vb[p]))
        for tok in da.keys() & db.keys():
            assert abs(da[tok] - db[tok]) <= tol, (p, tok)
        for tok in da.keys() ^ db.keys():
            v = da.get(tok, db.get(tok))
            assert v <= min(va[p, -1], vb[p, -1]) + tol, f"position {p}: token {tok} ({v}) kept by one engine is not a boundary tie"
    # The tail, compared as probability mass: under vLLM it is 1 - sum(top-k), so the values' rounding
    # (k of them) shows up there.
    np.testing.assert_allclose(np.exp(a["tail_logprob"]), np.exp(b["tail_logprob"]), atol=tol, rtol=0)


def _cfg(teacher, data, out, backend, **kw) -> GenerateConfig:
    return GenerateConfig(teacher=str(teacher), out=str(out), backend=backend, logprob_codec="fp32", hidden_codec="fp32", data=data, **kw)


@pytest.fixture(scope="module")
def tiny_pair(tiny_teacher, text_jsonl, tmp_path_factory):
    """The same 64 rows scored by both backends, top-8 plus hidden layer 1, fp32 storage."""
    root = tmp_path_factory.mktemp("vllm_tiny")
    data = DataConfig(source=str(text_jsonl), max_length=64)
    out = {}
    for backend in ("transformers", "vllm"):
        generate(_cfg(tiny_teacher, data, root / backend, backend, top_k=8, hidden_layers=[1]), progress=False)
        out[backend] = root / backend
    return out


def test_tiny_parity_scores_tail_nll_hidden(tiny_pair):
    a, b = _rows(tiny_pair["transformers"]), _rows(tiny_pair["vllm"])
    assert a.keys() == b.keys() and len(a) == 64
    for eid in a:
        x, y = a[eid], b[eid]
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        np.testing.assert_array_equal(x["loss_mask"], y["loss_mask"])
        assert_topk_parity(x, y, k=8)
        assert abs(x["teacher_nll"] - y["teacher_nll"]) <= FP32_TOL
        np.testing.assert_allclose(x["hidden_1"], y["hidden_1"], atol=1e-5)
        # vLLM sees only the top-k: its entropy (top-k + one tail bucket) is a lower bound of the exact one.
        assert y["teacher_entropy"] <= x["teacher_entropy"] + FP32_TOL


def test_context_pooled_and_kept_fields_agree_across_backends(tiny_teacher, text_jsonl, tmp_path):
    """Context distillation, pooled embeddings and kept fields are the generate stage's, not an engine's: the
    vLLM cache equals the transformers one (top-k tie-aware, states to float tolerance), row for row."""
    rows = [json.loads(line) for line in text_jsonl.read_text().splitlines()][:12]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"], "topic": r["text"].split()[0], "n": i}) + "\n" for i, r in enumerate(rows)))
    data = DataConfig(source=str(path), max_length=48)
    for backend in ("transformers", "vllm"):
        generate(_cfg(tiny_teacher, data, tmp_path / backend, backend, top_k=8, context="notes on {topic} :", pooled_layers=[-1],
                      keep_fields=["n"]), progress=False)
    a, b = _rows(tmp_path / "transformers"), _rows(tmp_path / "vllm")
    assert a.keys() == b.keys() and len(a) == 12
    for key in a:
        assert a[key]["context_tokens"] == b[key]["context_tokens"] > 0 and a[key]["n"] == b[key]["n"] == int(key)
        np.testing.assert_array_equal(a[key]["input_ids"], b[key]["input_ids"])
        assert_topk_parity(a[key], b[key], 8)
        np.testing.assert_allclose(a[key]["pooled_2"], b[key]["pooled_2"], rtol=1e-4, atol=1e-4)


def test_vllm_manifest_records_backend_and_entropy_kind(tiny_pair):
    m = open_cache(tiny_pair["vllm"]).manifest
    assert m.teacher["backend"] == "vllm" and m.teacher["engine"].startswith("vllm ")
    assert m.settings["scoring"]["entropy"] == "topk_tail"
    assert open_cache(tiny_pair["transformers"]).manifest.settings["scoring"]["entropy"] == "exact"
    # Same weights, same tokenizer: the two caches are interchangeable for a student.
    assert m.settings["tokenizer"] == open_cache(tiny_pair["transformers"]).manifest.settings["tokenizer"]
    assert m.teacher["weights_fingerprint"] == open_cache(tiny_pair["transformers"]).manifest.teacher["weights_fingerprint"]


def test_vllm_generation_caches_scored_continuations(tiny_teacher, text_jsonl, tmp_path):
    """One engine pass yields continuations with their top-k; they equal a teacher-forced re-score."""
    from conftest import WORDS

    stops = list(WORDS[:12])  # frequent enough that some continuations stop early
    gen = GenerationConfig(enabled=True, max_new_tokens=6, num_samples=2, do_sample=True, temperature=1.0, stop=stops)
    cfg = _cfg(tiny_teacher, DataConfig(source=str(text_jsonl), max_length=64, max_rows=10), tmp_path / "gen", "vllm", top_k=8, generation=gen, seed=7)
    generate(cfg, progress=False)
    rows = _rows(tmp_path / "gen")
    assert len(rows) == 20 and all("#g" in eid for eid in rows)
    ref = TransformersTeacher(str(tiny_teacher), dtype="float32")
    ref.load()
    seqs = [np.asarray(ex["input_ids"]) for ex in rows.values()]
    for ex, s, seq in zip(rows.values(), ref.score(seqs, 8, []), seqs):
        plen = ex["prompt_length"]
        assert 0 < plen < len(seq) <= plen + 6
        mask = np.asarray(ex["loss_mask"])
        assert not mask[: plen - 1].any() and mask[plen - 1 :].all()
        assert_topk_parity({"topk_ids": s["topk_ids"], "topk_logprobs": s["topk_logprobs"], "tail_logprob": s["tail_logprob"]}, ex, k=8)
    # Stop strings: a continuation ends at the token that completes one, or runs to max_new_tokens.
    stopped = 0
    for ex in rows.values():
        cont = np.asarray(ex["input_ids"])[ex["prompt_length"] :]
        texts = [ref.tokenizer.decode(cont[:n], skip_special_tokens=True) for n in range(1, len(cont) + 1)]  # as vLLM matches
        hits = [any(w in t for w in stops) for t in texts]
        assert not any(hits[:-1]), texts
        stopped += hits[-1] and len(cont) < 6
    assert stopped > 0
    # Two samples per prompt, drawn with per-row seeds: they are not all copies of each other.
    by_row: dict[str, list] = {}
    for eid, ex in rows.items():
        by_row.setdefault(eid.split("#")[0], []).append(tuple(ex["input_ids"]))
    assert sum(len(set(v)) == 2 for v in by_row.values()) >= 5


def test_rows_longer_than_engine_limit_are_truncated_not_fatal(tiny_teacher, text_jsonl, tmp_path):
    cfg = _cfg(tiny_teacher, DataConfig(source=str(text_jsonl), max_length=64, max_rows=16), tmp_path / "c", "vllm",
               top_k=4, vllm=VLLMConfig(max_model_len=12))
    m = generate(cfg, progress=False)
    lengths = [len(ex["input_ids"]) for ex in open_cache(tmp_path / "c").stream()]
    assert m.num_rows == 16 and max(lengths) == 11 and m.settings["dataset"]["max_length"] == 11
    assert m.stats["truncated_rows"] > 0


def test_errors_before_any_engine_starts(tiny_teacher, text_jsonl, tmp_path):
    data = DataConfig(source=str(text_jsonl))
    with pytest.raises(ConfigError, match="top_k 100000 is larger than the teacher's vocabulary"):
        generate(_cfg(tiny_teacher, data, tmp_path / "a", "vllm", top_k=100_000), progress=False)
    with pytest.raises(ConfigError, match="teacher .* not found: no file or folder at that path"):
        generate(_cfg(tmp_path / "nope", data, tmp_path / "b", "vllm"), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_engine_out_of_memory_names_the_knob(tiny_teacher, text_jsonl, tmp_path):
    cfg = _cfg(tiny_teacher, DataConfig(source=str(text_jsonl), max_rows=4), tmp_path / "c", "vllm", top_k=4,
               vllm=VLLMConfig(kv_cache_gib=100_000))
    env_before = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    try:
        with pytest.raises(KDCacheError, match="vLLM would run out of memory.*100000 GiB.*lower --set vllm.kv_cache_gib"):
            generate(cfg, progress=False)
    finally:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        if env_before is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = env_before
    assert not (tmp_path / "c").exists()


_BLOCK_VLLM = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError("No module named 'vllm'")
sys.meta_path.insert(0, Block())
from kdcache.pipeline.teachers.vllm_backend import vllm_available
assert not vllm_available()
from kdcache.cli import main
main()
"""


def test_without_vllm_the_error_names_the_install_command(tiny_teacher, text_jsonl, tmp_path):
    cmd = [sys.executable, "-c", _BLOCK_VLLM, "generate", "--backend", "vllm", "--teacher", str(tiny_teacher),
           "--dataset", str(text_jsonl), "--out", str(tmp_path / "c")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: backend vllm needs vLLM")
    assert 'pip install "kdcache[vllm]"' in lines[0] and "scripts/install-vllm-cpu.sh" in lines[0]
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_gguf_teacher_is_refused_with_the_convert_command(text_jsonl, tmp_path):
    from kdcache.pipeline.smollm2 import smollm2_gguf

    with pytest.raises(ConfigError, match="kdcache convert"):
        generate(_cfg(smollm2_gguf(), DataConfig(source=str(text_jsonl)), tmp_path / "c", "vllm"), progress=False)


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    """The embedded GGUF teacher as an fp32 model folder, the form vLLM loads."""
    from kdcache.pipeline.convert import convert_model
    from kdcache.pipeline.smollm2 import smollm2_gguf

    return convert_model(str(smollm2_gguf()), tmp_path_factory.mktemp("smol") / "fp32", dtype="float32")


@pytest.mark.slow
def test_smollm2_parity_top64(smollm2_folder, tmp_path):
    """30 fp32 layers: each engine is within 1e-4 of a float64 forward pass; between the two the rounding
    of both adds up (measured: median 3e-5, 99.9th percentile 9e-5, max 1.3e-4)."""
    import torch
    from transformers import AutoModelForCausalLM

    data = DataConfig(source="embedded:stdlib-docs", max_rows=16, max_length=96)
    for backend in ("transformers", "vllm"):
        generate(_cfg(smollm2_folder, data, tmp_path / backend, backend, top_k=64), progress=False)
    a, b = _rows(tmp_path / "transformers"), _rows(tmp_path / "vllm")
    assert a.keys() == b.keys() and len(a) == 16
    gaps = []
    for eid in a:
        assert_topk_parity(a[eid], b[eid], k=64, tol=2 * FP32_TOL)
        assert abs(a[eid]["teacher_nll"] - b[eid]["teacher_nll"]) <= FP32_TOL
        gaps.append(np.abs(np.asarray(a[eid]["topk_logprobs"]) - np.asarray(b[eid]["topk_logprobs"])).ravel())
    assert np.quantile(np.concatenate(gaps), 0.999) <= FP32_TOL
    # Against the truth: float64 log-probabilities at each engine's own top-k ids.
    ref_model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float64).eval()
    for eid in list(a)[:3]:
        ids = torch.tensor(np.asarray(a[eid]["input_ids"], dtype=np.int64))[None]
        with torch.no_grad():
            ref = torch.log_softmax(ref_model(ids).logits[0, :-1], -1).numpy()
        for ex in (a[eid], b[eid]):
            got = np.asarray(ex["topk_logprobs"], dtype=np.float64).reshape(-1, 64)
            want = np.take_along_axis(ref, np.asarray(ex["topk_ids"]).reshape(-1, 64).astype(np.int64), 1)
            np.testing.assert_allclose(got, want, atol=FP32_TOL, rtol=0)
    # A real model: the teacher is confident, the tail is a small slice of the mass.
    assert np.mean([np.exp(ex["tail_logprob"]).mean() for ex in b.values()]) < 0.2
    assert json.loads((tmp_path / "vllm" / MANIFEST_NAME).read_text())["settings"]["teacher"]["architecture"] == "LlamaForCausalLM"
