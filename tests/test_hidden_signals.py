"""Hidden states worth storing (int8 per token, a seeded orthogonal projection, a subset of positions) and
the teacher's pre-RoPE q/k/v projections, against independent references: float64 arithmetic, the model's
own ``output_hidden_states`` forward and its attention modules called directly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdcache.cache import open_cache, read_manifest, verify_cache
from kdcache.cache.hidden import orthogonal_projection, parse_positions, select_positions
from kdcache.config import build_config
from kdcache.errors import CacheMismatchError, ConfigError
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher
from test_generate import make_cfg, run


@pytest.fixture(scope="module")
def model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


def hidden_states(model, input_ids) -> tuple:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(np.asarray(input_ids, dtype=np.int64))[None], output_hidden_states=True).hidden_states


# --------------------------------------------------------------------------------------------------
# projection


@pytest.mark.parametrize("width,dim", [(64, 16), (576, 192), (10, 9)])
def test_projection_is_orthonormal_and_a_function_of_its_seed(width, dim):
    P = orthogonal_projection(width, dim, seed=3)
    assert P.shape == (width, dim) and P.dtype == np.float32
    np.testing.assert_allclose(P.astype(np.float64).T @ P.astype(np.float64), np.eye(dim), atol=1e-5)
    np.testing.assert_array_equal(P, orthogonal_projection(width, dim, seed=3))  # rebuilt bit for bit
    assert not np.allclose(P, orthogonal_projection(width, dim, seed=4))


@pytest.mark.parametrize("dim", [0, 64, 65])
def test_projection_needs_a_smaller_width(dim):
    with pytest.raises(ConfigError, match="0 < dim < width"):
        orthogonal_projection(64, dim, 0)


# --------------------------------------------------------------------------------------------------
# positions


def test_stride_positions_are_exact():
    np.testing.assert_array_equal(select_positions("stride:3", 10, 0, "x"), [0, 3, 6, 9])
    np.testing.assert_array_equal(select_positions("stride:1", 4, 0, "x"), [0, 1, 2, 3])
    np.testing.assert_array_equal(select_positions("stride:50", 7, 0, "x"), [0])
    np.testing.assert_array_equal(select_positions("all", 5, 0, "x"), np.arange(5))
    assert select_positions("stride:2", 9, 0, "x").dtype == np.int32


def test_fraction_positions_are_seeded_per_example_and_keep_at_least_one():
    for T in (1, 2, 7, 100, 513):
        got = select_positions("fraction:0.25", T, 0, "12")
        assert len(got) == max(1, round(0.25 * T)) and np.all(np.diff(got) > 0) and got.min() >= 0 and got.max() < T
    a = select_positions("fraction:0.3", 200, 0, "5")
    np.testing.assert_array_equal(a, select_positions("fraction:0.3", 200, 0, "5"))  # deterministic
    assert not np.array_equal(a, select_positions("fraction:0.3", 200, 0, "6"))  # per example
    assert not np.array_equal(a, select_positions("fraction:0.3", 200, 1, "5"))  # per seed
    # Over many examples every position is about equally likely: the fraction is uniform, not a prefix.
    hits = np.zeros(50)
    for i in range(400):
        hits[select_positions("fraction:0.2", 50, 0, str(i))] += 1
    assert abs(hits.mean() / 400 - 0.2) < 1e-9 and hits.min() > 40 and hits.max() < 130


@pytest.mark.parametrize("spec", ["stride:0", "fraction:0", "fraction:1.5", "fraction:x", "every:2", "", "stride:-1"])
def test_bad_position_specs_are_one_line_errors(spec):
    with pytest.raises(ConfigError, match=r"hidden_positions must be all, stride:N .* got") as exc:
        parse_positions(spec)
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------------------------------
# real caches of the tiny teacher


@pytest.fixture(scope="module")
def full(tiny_teacher, text_jsonl, tmp_path_factory):
    """fp32 hidden states of every position: the reference the other caches are compared with."""
    out = tmp_path_factory.mktemp("hs") / "full"
    return run(tiny_teacher, out, text_jsonl, top_k=4, hidden_layers=[1, 2], hidden_codec="fp32", data={"max_rows": 12})


def test_positions_subset_stores_those_rows_only(tiny_teacher, text_jsonl, tmp_path, full):
    stride = run(tiny_teacher, tmp_path / "s", text_jsonl, top_k=4, hidden_layers=[1, 2], hidden_codec="fp32",
                 hidden_positions="stride:2", data={"max_rows": 12})
    frac = run(tiny_teacher, tmp_path / "f", text_jsonl, top_k=4, hidden_layers=[1, 2], hidden_codec="fp32",
               hidden_positions="fraction:0.3", seed=7, batch_tokens=64, data={"max_rows": 12})
    m = read_manifest(tmp_path / "f")
    assert m.signals["hidden"]["positions"] == "fraction:0.3" and m.signals["hidden"]["positions_seed"] == 7
    assert m.signals["hidden"]["columns"]["hidden_positions"] == {"shape": ["P"], "dtype": "int32", "codec": "plain"}
    for a, s, f in zip(full, stride, frac):
        T = len(a["input_ids"])
        np.testing.assert_array_equal(s["hidden_positions"], np.arange(0, T, 2))
        assert f["hidden_positions"].dtype == np.int32 and len(f["hidden_positions"]) == max(1, round(0.3 * T))
        np.testing.assert_array_equal(f["hidden_positions"], select_positions("fraction:0.3", T, 7, a["example_id"]))
        for ex in (s, f):
            for layer in (1, 2):
                assert ex[f"hidden_{layer}"].shape == (len(ex["hidden_positions"]), 64)
                np.testing.assert_allclose(ex[f"hidden_{layer}"], a[f"hidden_{layer}"][ex["hidden_positions"]], atol=1e-5)
    assert verify_cache(tmp_path / "f", deep=True).ok and "hidden_positions" not in full[0]


def test_positions_all_changes_nothing(tiny_teacher, text_jsonl, tmp_path):
    """The default stores what a cache stored before these settings existed: no positions column, shape [T, H],
    and the same signals and settings (so such caches still resume)."""
    run(tiny_teacher, tmp_path / "c", text_jsonl, top_k=4, hidden_layers=[1], hidden_positions="all", data={"max_rows": 2})
    cache = open_cache(tmp_path / "c")
    assert "hidden_positions" not in cache.columns and "hidden_1_scale" not in cache.columns
    assert cache.manifest.signals["hidden"] == {
        "layers": [1], "size": 64, "columns": {"hidden_1": {"shape": ["T", 64], "dtype": "halffloat", "codec": "fp16"}}}
    assert not {"hidden_positions", "hidden_project_dim", "attention_layers"} & set(cache.manifest.settings["scoring"])
    assert "qkv" not in cache.manifest.signals


def _int8_bound(x: np.ndarray) -> np.ndarray:
    """Per value: half a step of the token's scale, max|x| / 254, plus float32 rounding."""
    amax = np.abs(x.astype(np.float64)).max(axis=-1, keepdims=True)
    return amax / 254 * (1 + 1e-5) + 1e-30


def test_int8_cache_dequantises_every_token_within_its_scale(tiny_teacher, text_jsonl, tmp_path, full):
    got = run(tiny_teacher, tmp_path / "q", text_jsonl, top_k=4, hidden_layers=[1, 2], hidden_codec="int8", data={"max_rows": 12})
    cache = open_cache(tmp_path / "q")
    cols = cache.manifest.signals["hidden"]["columns"]
    assert cols["hidden_1"] == {"shape": ["T", 64], "dtype": "int8", "codec": "int8", "layout": "binary", "scale_column": "hidden_1_scale"}
    assert cols["hidden_1_scale"]["shape"] == ["T"] and "hidden_1_scale" in cache.columns
    # One byte per value on disk: a binary blob per example (Parquet would store list<int8> as INT32).
    import pyarrow.parquet as pq

    f = pq.ParquetFile(tmp_path / "q" / "part-00000.parquet")
    assert f.schema_arrow.field("hidden_1").type == "binary"
    table = f.read(columns=["hidden_1", "input_ids"])
    assert [len(b) for b in table.column("hidden_1").to_pylist()] == [64 * len(t) for t in table.column("input_ids").to_pylist()]
    for a, b in zip(full, got):
        assert "hidden_1_scale" not in b  # consumed by the reader
        for layer in (1, 2):
            x, y = a[f"hidden_{layer}"], b[f"hidden_{layer}"]
            assert y.dtype == np.float32 and y.shape == x.shape
            assert np.all(np.abs(y.astype(np.float64) - x) <= _int8_bound(x))
    # A column subset still decodes: the scale column is read along.
    ex = next(iter(cache.stream(columns=["hidden_2"])))
    np.testing.assert_array_equal(ex["hidden_2"], got[0]["hidden_2"])
    assert verify_cache(tmp_path / "q", deep=True).ok


def test_int8_projected_cache_is_h_times_p(tiny_teacher, text_jsonl, tmp_path, full):
    got = run(tiny_teacher, tmp_path / "p", text_jsonl, top_k=4, hidden_layers=[1], hidden_codec="int8",
              hidden_project_dim=16, hidden_project_seed=5, hidden_positions="stride:3", data={"max_rows": 12})
    h = read_manifest(tmp_path / "p").signals["hidden"]
    assert (h["size"], h["width"], h["project_dim"], h["project_seed"]) == (16, 64, 16, 5)
    P = orthogonal_projection(h["width"], h["project_dim"], h["project_seed"]).astype(np.float64)
    for a, b in zip(full, got):
        ref = a["hidden_1"][b["hidden_positions"]].astype(np.float64) @ P
        assert b["hidden_1"].shape == (len(b["hidden_positions"]), 16)
        assert np.all(np.abs(b["hidden_1"] - ref) <= _int8_bound(ref) + 1e-5 * np.abs(ref).max())
    assert verify_cache(tmp_path / "p", deep=True).ok


# --------------------------------------------------------------------------------------------------
# q/k/v


def test_qkv_equals_the_blocks_own_projections(tiny_teacher, text_jsonl, tmp_path, model):
    exs = run(tiny_teacher, tmp_path / "a", text_jsonl, top_k=4, attention_layers=[2], hidden_codec="fp32", data={"max_rows": 6})
    bf = run(tiny_teacher, tmp_path / "b", text_jsonl, top_k=4, attention_layers=[-1], hidden_codec="bf16", data={"max_rows": 6})
    m = read_manifest(tmp_path / "a")
    q = m.signals["qkv"]
    assert (q["layers"], q["sizes"], q["num_heads"], q["num_kv_heads"], q["head_dim"]) == ([2], [64, 32, 32], 2, 1, 32)
    assert q["columns"]["qkv_2"]["shape"] == ["T", 128] and "pre-RoPE" in q["tensor"]
    assert m.settings["scoring"]["attention_layers"] == [2]
    block = model.model.layers[1]
    for ex, b in zip(exs, bf):
        hs = hidden_states(model, ex["input_ids"])
        with torch.no_grad():
            x = block.input_layernorm(hs[1][0])
            ref = torch.cat([block.self_attn.q_proj(x), block.self_attn.k_proj(x), block.self_attn.v_proj(x)], -1).numpy()
        assert ex["qkv_2"].shape == (len(ex["input_ids"]), 128) and ex["qkv_2"].dtype == np.float32
        np.testing.assert_allclose(ex["qkv_2"], ref, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(b["qkv_2"], ref, rtol=2.0 ** -8, atol=1e-6)
        assert not any(k.startswith("hidden_") for k in ex)
    assert verify_cache(tmp_path / "a", deep=True).ok


def test_qkv_int8_and_hidden_together(tiny_teacher, text_jsonl, tmp_path, full):
    got = run(tiny_teacher, tmp_path / "q", text_jsonl, top_k=4, attention_layers=[1, 2], hidden_layers=[1], hidden_codec="int8",
              hidden_positions="stride:2", data={"max_rows": 12})
    ref = run(tiny_teacher, tmp_path / "r", text_jsonl, top_k=4, attention_layers=[1, 2], hidden_codec="fp32", data={"max_rows": 12})
    for a, b, f in zip(ref, got, full):
        for blk in (1, 2):
            assert b[f"qkv_{blk}"].shape == a[f"qkv_{blk}"].shape  # all positions: hidden_positions do not apply
            assert np.all(np.abs(b[f"qkv_{blk}"].astype(np.float64) - a[f"qkv_{blk}"]) <= _int8_bound(a[f"qkv_{blk}"]))
        assert np.all(np.abs(b["hidden_1"] - f["hidden_1"][::2]) <= _int8_bound(f["hidden_1"][::2]) + 1e-5)
    assert verify_cache(tmp_path / "q", deep=True).ok


def test_changed_hidden_or_attention_settings_do_not_resume(tiny_teacher, text_jsonl, tmp_path):
    base = dict(top_k=4, hidden_layers=[1], attention_layers=[2], data={"max_rows": 2})
    run(tiny_teacher, tmp_path / "c", text_jsonl, **base)
    for change in ({"attention_layers": [1]}, {"hidden_project_dim": 8}, {"hidden_positions": "stride:2"}, {"hidden_codec": "int8"}):
        with pytest.raises(CacheMismatchError, match="different settings"):
            generate(make_cfg(tiny_teacher, tmp_path / "c", text_jsonl, **{**base, **change}), progress=False)
    generate(make_cfg(tiny_teacher, tmp_path / "c", text_jsonl, **base), progress=False)  # the same settings: complete, a no-op


# --------------------------------------------------------------------------------------------------
# refusals: one line, before the teacher loads


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(self):
        raise AssertionError("the teacher was loaded before the settings were refused")

    monkeypatch.setattr(TransformersTeacher, "load", refuse)


@pytest.mark.parametrize("kw,match", [
    ({"hidden_layers": [1], "hidden_project_dim": 64}, r"hidden_project_dim 64 must be smaller than the teacher's hidden size 64"),
    ({"hidden_layers": [1], "hidden_project_dim": 100}, r"--set hidden_project_dim=D with D < 64"),
    ({"attention_layers": [3]}, r"attention layer 3 out of range: the teacher has blocks 1\.\.2"),
    ({"attention_layers": [-3]}, r"attention layer -3 out of range"),
    ({"attention_layers": [0]}, r"attention_layers are decoder blocks 1\.\.num_layers"),
    ({"hidden_layers": [1], "hidden_positions": "stride:0"}, r"hidden_positions must be all, stride:N"),
    ({"hidden_project_dim": 8}, r"pass --hidden-layers"),
    ({"hidden_positions": "stride:2"}, r"pass --hidden-layers"),
])
def test_bad_values_are_refused_in_one_line_before_the_teacher_loads(tiny_teacher, text_jsonl, tmp_path, no_loading, kw, match):
    with pytest.raises(ConfigError, match=match) as exc:
        generate(make_cfg(tiny_teacher, tmp_path / "c", text_jsonl, top_k=4, **kw), progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "c").exists()


def test_a_model_without_q_k_v_projections_is_refused(tmp_path, text_jsonl, tiny_teacher, no_loading):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match=r"attention_layers need Llama-style attention: .*drop attention_layers") as exc:
        generate(make_cfg(tmp_path / "gpt2", tmp_path / "c", text_jsonl, top_k=4, attention_layers=[1]), progress=False)
    assert "\n" not in str(exc.value) and not (tmp_path / "c").exists()


def test_set_overrides_reach_the_new_fields():
    cfg = build_config(GenerateConfig, overrides=[
        "hidden_codec=int8", "hidden_project_dim=192", "hidden_project_seed=3", "hidden_positions=fraction:0.25",
        "attention_layers=[2, -1]", "hidden_layers=[10]"])
    assert (cfg.hidden_codec, cfg.hidden_project_dim, cfg.hidden_project_seed, cfg.hidden_positions, cfg.attention_layers) == (
        "int8", 192, 3, "fraction:0.25", [2, -1])
    with pytest.raises(ConfigError, match="not one of"):
        build_config(GenerateConfig, overrides=["hidden_codec=int4"])


# --------------------------------------------------------------------------------------------------
# the real teacher (SmolLM2-135M)


@pytest.mark.slow
def test_smollm2_projection_is_h_times_p_of_the_teachers_own_hidden_state(tmp_path):
    from kdcache.pipeline.smollm2 import smollm2_gguf
    from kdcache.pipeline.teachers import build_teacher

    cfg = GenerateConfig(teacher=str(smollm2_gguf()), out=str(tmp_path / "c"), top_k=1, device="cpu", hidden_layers=[10],
                         hidden_codec="fp32", hidden_project_dim=192, hidden_project_seed=11, attention_layers=[-1],
                         data=DataConfig(source="embedded:stdlib-docs", max_rows=4, max_length=48))
    teacher = build_teacher(cfg)
    try:
        generate(cfg, progress=False, teacher=teacher)
        m = read_manifest(tmp_path / "c")
        h = m.signals["hidden"]
        assert (h["size"], h["width"], h["project_dim"]) == (192, 576, 192)
        q = m.signals["qkv"]
        assert (q["layers"], q["sizes"], q["num_heads"], q["num_kv_heads"], q["head_dim"]) == ([30], [576, 192, 192], 9, 3, 64)
        P = orthogonal_projection(h["width"], h["project_dim"], h["project_seed"]).astype(np.float64)
        model = teacher.model
        for ex in open_cache(tmp_path / "c"):
            hs = hidden_states(model, ex["input_ids"])
            ref = hs[10][0].double().numpy() @ P  # the independent forward, not the hooks
            err = np.linalg.norm(ex["hidden_10"] - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
            assert ex["hidden_10"].shape == (len(ex["input_ids"]), 192) and err.max() < 1e-4, err.max()
            block = model.model.layers[29]
            with torch.no_grad():
                x = block.input_layernorm(hs[29][0])
                qkv = torch.cat([block.self_attn.q_proj(x), block.self_attn.k_proj(x), block.self_attn.v_proj(x)], -1).numpy()
            err = np.linalg.norm(ex["qkv_30"] - qkv, axis=-1) / np.linalg.norm(qkv, axis=-1)
            assert ex["qkv_30"].shape == (len(ex["input_ids"]), 960) and err.max() < 1e-4, err.max()
    finally:
        teacher.close()


@pytest.mark.parametrize("positions,ok", [([0, 2, 4], True), ([0, 2, 9], False), ([2, 2, 4], False), ([3, 1, 4], False), ([-1, 0, 1], False)])
def test_deep_verify_checks_the_stored_positions(tmp_path, positions, ok):
    from kdcache.cache import CacheWriter, make_signals

    signals = make_signals(2, 50, hidden_layers=[1], hidden_size=4, hidden_codec="int8", hidden_positions="stride:2")
    T = 6
    ex = {"example_id": "0", "input_ids": np.arange(T), "loss_mask": np.ones(T - 1, bool), "topk_ids": np.zeros((T - 1, 2)),
          "topk_logprobs": np.zeros((T - 1, 2)), "tail_logprob": np.zeros(T - 1), "teacher_nll": 0.0, "teacher_entropy": 0.0,
          "num_loss_tokens": T - 1, "hidden_positions": np.array(positions), "hidden_1": np.ones((3, 4))}
    with CacheWriter(tmp_path / "c", {"x": 1}, signals) as w:
        w.add_row([ex], 1)
    report = verify_cache(tmp_path / "c", deep=True)
    assert report.ok == ok, report.lines()
    if not ok:
        assert "hidden_positions outside [0, T) or not strictly ascending" in report.lines()[0]
    else:
        np.testing.assert_array_equal(next(iter(open_cache(tmp_path / "c")))["hidden_1"], np.ones((3, 4), np.float32))
