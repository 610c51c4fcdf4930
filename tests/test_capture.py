"""Every capture (kdcache/pipeline/teachers/capture.py) against a float64 reference computed here from the same
logits: top-k set and values, tail mass (tiny tails and ties at the k-th logit included), entropy, the target's
log-probability, tempered tails and sampled tokens; fp32, bf16 and fp16 logits, blocks that do not divide the
rows. Then a real teacher scored with each capture in bf16 gives the same numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache.errors import ConfigError
from kdcache.pipeline.teachers.capture import CaptureSpec, capture_names, capture_positions, get_capture

EAGER = [n for n in capture_names() if n != "compiled"]


def _logits(n: int, V: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of every kind a teacher produces: flat, peaked (tails down to ~1e-30), coarse values with many
    ties at the k-th logit, and a few masked (-inf) tokens."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64) * 6
    z[::3, :8] += torch.linspace(70, 40, 8, dtype=torch.float64)  # peaked rows: top-8 hold all but ~e^-40
    z[1::4] = (z[1::4] * 2).round() / 2  # coarse rows: ties everywhere, also at the k-th value
    z[2::5, -3:] = float("-inf")  # masked tokens
    return z.to(dtype)


def _reference(z: torch.Tensor, targets: torch.Tensor) -> dict:
    logp = torch.log_softmax(z.double(), dim=-1)  # upcasting the given dtype is exact
    p = logp.exp()
    return {"logp": logp, "entropy": -torch.where(p > 0, p * logp, 0.0).sum(-1),
            "target": logp.gather(-1, targets[:, None]).squeeze(-1)}


def _check(got: dict, z: torch.Tensor, targets: torch.Tensor, k: int, temps=()) -> None:
    ref = _reference(z, targets)
    logp = ref["logp"]
    assert torch.allclose(got["entropy"].double(), ref["entropy"], atol=2e-4, rtol=1e-5)
    assert torch.allclose(got["target_logprob"].double(), ref["target"], atol=2e-5, rtol=1e-6)
    if not k:
        assert "topk_ids" not in got
        return
    ids = got["topk_ids"].long()
    assert ids.shape == (z.shape[0], k) and got["topk_ids"].dtype == torch.int32
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all(), "ids repeat within a row"
    chosen = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, ids, True)
    # a valid top-k: nothing left out is above anything taken (ties may go either way)
    taken_min = torch.where(chosen, logp, math.inf).amin(-1)
    left_max = torch.where(chosen, -math.inf, logp).amax(-1)
    assert (left_max <= taken_min).all()
    vals = got["topk_logprobs"].double()
    assert torch.allclose(vals, logp.gather(-1, ids), atol=2e-5, rtol=1e-6)
    steps = vals.diff(dim=-1)
    assert ((steps <= 0) | steps.isnan()).all(), "top-k not most likely first"  # nan: -inf after -inf (masked)
    tail_ref = torch.logsumexp(torch.where(chosen, -math.inf, logp), dim=-1)
    tail = got["tail_logprob"].double()
    finite = torch.isfinite(tail_ref)
    assert torch.equal(torch.isfinite(tail), finite)
    # log of the tail to 1e-4 nats however small it is (no 1 - sum(top-k) cancellation)
    assert torch.allclose(tail[finite], tail_ref[finite], atol=1e-4, rtol=1e-5)
    if 7 <= k < z.shape[-1]:
        assert (tail_ref[finite] < -20).any(), "the data has no tiny tails to test"
    for j, t in enumerate(temps):
        ref_t = torch.logsumexp(torch.where(chosen, -math.inf, logp) / t, -1) - torch.logsumexp(logp / t, -1)
        got_t = got["tail_logprob_tempered"][:, j].double()
        ok = torch.isfinite(ref_t)
        assert torch.allclose(got_t[ok], ref_t[ok], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", EAGER)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [0, 1, 7, 64])
def test_capture_matches_float64(name, dtype, k):
    n, V = 53, 3001
    z = _logits(n, V, dtype, seed=k)
    targets = torch.randint(0, V - 3, (n,), generator=torch.Generator().manual_seed(1))
    # blocks of 3 rows (53 = 17*3 + 2) for fused: blocks that do not divide the chunk
    spec = CaptureSpec(k, block_bytes=3 * 4 * V)
    _check(get_capture(name)(z, targets, spec, None), z, targets, k)


@pytest.mark.parametrize("name", EAGER)
def test_whole_vocabulary_topk_has_no_tail(name):
    z = _logits(9, 40, torch.bfloat16, seed=3)
    got = get_capture(name)(z, torch.zeros(9, dtype=torch.long), CaptureSpec(40, block_bytes=1), None)
    assert torch.isneginf(got["tail_logprob"]).all()
    _check(got, z, torch.zeros(9, dtype=torch.long), 40)


@pytest.mark.parametrize("name", EAGER)
def test_tempered_tails_and_sampling(name):
    n, V = 31, 2000
    z = _logits(n, V, torch.bfloat16, seed=5)
    targets = torch.arange(n)
    u = torch.rand(n, 12, generator=torch.Generator().manual_seed(2))
    spec = CaptureSpec(16, tail_temperatures=(0.5, 2.0), sampling_temperature=1.5, block_bytes=4 * 4 * V)
    got = get_capture(name)(z, targets, spec, u)
    _check(got, z, targets, 16, temps=(0.5, 2.0))
    # sampled tokens: the draws the float64 distribution gives with the same uniforms (a draw within float32
    # rounding of a CDF step may land on its neighbour, so compare the drawn sets row by row)
    from kdcache.pipeline.teachers.sampling import sample_sparse

    ref_ids, ref_w, ref_n = sample_sparse(torch.log_softmax(z.double(), -1), u.double(), 1.5)
    same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(torch.split(got["sampled_ids"], got["sampled_sizes"].tolist()),
                                                                 torch.split(ref_ids, ref_n.tolist()))]
    assert np.mean(same) >= 0.9, f"{np.mean(same):.2f} of rows drew the reference's tokens"
    if all(same):
        assert torch.allclose(got["sampled_weights"].double(), ref_w.double(), rtol=1e-3)


def test_chunks_and_head():
    """capture_positions applies the head chunk by chunk, cuts padded vocabulary columns, concatenates."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(70, 16, generator=g)
    head = torch.nn.Linear(16, 130, bias=False)  # 130 columns, a vocabulary of 120
    targets = torch.randint(0, 120, (70,), generator=g)
    with torch.no_grad():
        got = capture_positions(feats, head, targets, 120, CaptureSpec(5), get_capture("fused"), chunk_tokens=16)
        z = head(feats)[:, :120]
    _check(got, z, targets, 5)


def test_unknown_capture_is_one_line():
    with pytest.raises(ConfigError, match="unknown capture 'fast'.*compiled, fused, naive"):
        get_capture("fast")
    from kdcache.pipeline.config import GenerateConfig

    with pytest.raises(ConfigError, match="unknown capture"):
        GenerateConfig(capture="fast")
    from kdcache.pipeline.teachers.capture import resolve_capture

    assert resolve_capture("auto", torch.device("cpu")) is get_capture("fused")
    assert resolve_capture("auto", torch.device("cuda")) is get_capture("compiled")


def test_compiled_matches_float64():
    """torch.compile of the block function (inductor builds C++ on CPU: minutes on a slow machine for the
    first shapes, so one dtype here; dynamic shapes keep it to one compile)."""
    import shutil

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++)")
    for n, seed in ((41, 0), (17, 1)):
        z = _logits(n, 2500, torch.bfloat16, seed=seed)
        targets = torch.randint(0, 2497, (n,), generator=torch.Generator().manual_seed(seed))
        _check(get_capture("compiled")(z, targets, CaptureSpec(33), None), z, targets, 33)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_teacher_scores_agree_across_captures(tiny_teacher, dtype):
    """The real scoring path (TransformersTeacher.score) with each capture: same top-k, tails, entropies."""
    from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher

    rng = np.random.default_rng(0)
    seqs = [rng.integers(4, 60, size=n).astype(np.int32) for n in (5, 17, 9, 30)]
    scored = {}
    for name in capture_names():  # compiled included: under score's inference_mode
        teacher = TransformersTeacher(str(tiny_teacher), device="cpu", dtype=dtype, capture=name, logits_chunk_tokens=7)
        teacher.load()
        scored[name] = teacher.score(seqs, top_k=8, hidden_layers=[])
    base = scored["naive"]
    for name, rows in scored.items():
        for a, b in zip(base, rows):
            assert set(a) == set(b)
            np.testing.assert_array_equal(np.sort(a["topk_ids"], -1), np.sort(b["topk_ids"], -1))
            for field in ("topk_logprobs", "tail_logprob", "entropy", "target_logprob"):
                np.testing.assert_allclose(a[field], b[field], atol=2e-5, rtol=1e-5, err_msg=f"{name} {field}")


def test_compile_failure_is_one_line():
    """A machine where torch.compile cannot build (here: inductor pointed at a C++ compiler that does not exist,
    a real failure, in a fresh process so this one's compile caches stay clean) gets one line naming the fix."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch, torch._inductor.config as ic
        from kdcache.errors import KDCacheError
        from kdcache.pipeline.teachers.capture import CaptureSpec, get_capture
        with ic.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False, "fx_graph_remote_cache": False}):
            try:
                get_capture("compiled")(torch.randn(5, 300), torch.zeros(5, dtype=torch.long), CaptureSpec(4), None)
            except KDCacheError as exc:
                print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300).stdout.strip()
    assert out.startswith("capture=compiled: torch.compile failed on cpu (") and out.endswith("pass --set capture=fused"), out
    assert "\n" not in out


def test_capture_is_not_a_cache_setting(tiny_teacher, text_jsonl, tmp_path):
    """A cache written with one capture is the cache of another: a rerun with another capture finds it complete
    (no settings mismatch), and two caches written with different captures hold the same numbers."""
    from kdcache.cache import open_cache
    from kdcache.pipeline.config import DataConfig, GenerateConfig
    from kdcache.pipeline.generate import generate

    def cfg(out, capture):
        return GenerateConfig(teacher=str(tiny_teacher), out=str(out), device="cpu", dtype="bfloat16", top_k=8,
                              logprob_codec="fp32", capture=capture, data=DataConfig(source=str(text_jsonl), max_rows=6))

    first = generate(cfg(tmp_path / "naive", "naive"), progress=False)
    again = generate(cfg(tmp_path / "naive", "fused"), progress=False)
    assert again.status == "complete" and again.settings_hash == first.settings_hash
    generate(cfg(tmp_path / "fused", "fused"), progress=False)
    a, b = (list(open_cache(tmp_path / n)) for n in ("naive", "fused"))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.sort(x["topk_ids"], -1), np.sort(y["topk_ids"], -1))
        for field in ("topk_logprobs", "tail_logprob"):
            np.testing.assert_allclose(x[field], y[field], atol=2e-5, rtol=1e-5)
