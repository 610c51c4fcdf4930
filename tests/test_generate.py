"""Tests of the generate stage (kdcache.pipeline.generate) against a real tiny teacher.

Everything is real: the random 2-layer Llama from conftest, real datasets files (jsonl/csv/parquet/txt),
real Parquet caches, and a real subprocess killed with SIGKILL for the resume test. Reference numbers
come from running the same model directly with transformers, one sequence at a time, without padding.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import WORDS, _sentences
from kdcache.cache import MANIFEST_NAME, open_cache, read_manifest
from kdcache.errors import CacheMismatchError, ConfigError, DataError, KDCacheError
from kdcache.pipeline.config import DataConfig, GenerateConfig, GenerationConfig
from kdcache.pipeline.generate import generate

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


# --------------------------------------------------------------------------------------------------
# helpers


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(teacher, out, source, *, data: dict | None = None, generation: dict | None = None, **kw) -> GenerateConfig:
    return GenerateConfig(
        teacher=str(teacher), out=str(out), device="cpu",
        data=DataConfig(source=str(source), **(data or {})),
        generation=GenerationConfig(**(generation or {})),
        **kw,
    )


def run(teacher, out, source, **kw) -> list[dict]:
    """Generate a cache and return its examples in stored order."""
    generate(make_cfg(teacher, out, source, **kw), progress=False)
    return list(open_cache(out))


def ids_of(tok, text: str, special: bool = True) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def chat_ids(tok, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


@pytest.fixture(scope="module")
def tok(tiny_teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher)


@pytest.fixture(scope="module")
def model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def texts(text_jsonl) -> list[str]:
    return [json.loads(line)["text"] for line in text_jsonl.read_text().splitlines()]


@torch.no_grad()
def ref_logprobs(model, ids) -> torch.Tensor:
    """[T-1, V] float64 log-probabilities of the next token, one unpadded sequence."""
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
    return torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), dim=-1)


def ref_stats(logp: torch.Tensor, ids, mask) -> tuple[float, float]:
    """(mean NLL of the target, mean entropy) over ``mask``."""
    targets = torch.as_tensor(np.asarray(ids[1:], dtype=np.int64))
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    m = torch.as_tensor(np.asarray(mask, dtype=bool))
    return float(nll[m].mean()), float(ent[m].mean())


# Tolerance for log-probabilities from two float32 forwards of the tiny teacher in other summation orders (padded
# batches of other shapes vs one unpadded sequence; GEMM blocking also follows the CPU's SIMD width), so they agree
# only up to rounding. The last contraction dominates: a logit is a 64-term fp32 dot product with
# sum_i |h_i W_ij| <= S = 25 on this fixture (conftest scales lm_head by 20), rounded by up to 64 * 2^-24 * S = 9.5e-5
# (worst case) and ~sqrt(64) * 2^-24 * S = 1.2e-5 (random walk); log_softmax subtracts the lse, a p-weighted mean of
# the same errors. The two forwards' errors are independent: difference ~2 * sqrt(2) * 1.2e-5 = 3.4e-5, bounded here by
# the worst case of one logit, 1e-4. Measured: <= 2.9e-6 between forwards (AVX-512, AVX2 and default kernels, 1 or 2
# threads) and 5.9e-6 between one float32 forward and float64 (1e-5, the old bound, was within 2x of that).
LOGPROB_TOL = 1e-4


def stats_tol(ent: float) -> dict:
    """pytest.approx bounds for teacher_nll / teacher_entropy given LOGPROB_TOL on each log-probability.

    nll is a mean of -log p: within LOGPROB_TOL. Entropy: with log p' = log p + d, |d| <= LOGPROB_TOL, p' = p e^d, so
    |H' - H| ~ |sum p d (1 + log p)| <= LOGPROB_TOL * (1 + H) per position, averaged: LOGPROB_TOL * (1 + mean H)."""
    return {"nll": dict(abs=LOGPROB_TOL, rel=0), "ent": dict(abs=LOGPROB_TOL * (1.0 + abs(ent)), rel=0)}


def assert_same_cache(a: list[dict], b: list[dict], atol: float = LOGPROB_TOL) -> None:
    assert [e["example_id"] for e in a] == [e["example_id"] for e in b]
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            if key in ("example_id", "input_ids", "loss_mask", "topk_ids", "num_loss_tokens", "prompt_length", "sample_index"):
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"{key} of {x['example_id']}")
            else:  # entropy: atol * (1 + H), see stats_tol
                tol = atol * (1.0 + abs(float(y[key]))) if key == "teacher_entropy" else atol
                np.testing.assert_allclose(x[key], y[key], atol=tol, rtol=0, err_msg=f"{key} of {x['example_id']}")


# --------------------------------------------------------------------------------------------------
# scoring correctness


@pytest.fixture(scope="module")
def fp32_cache(tiny_teacher, text_jsonl, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gen") / "fp32"
    return run(tiny_teacher, out, text_jsonl, top_k=8, logprob_codec="fp32", batch_tokens=4096, data={"max_length": 64, "max_rows": 24})


def test_scores_match_direct_forward_fp32(fp32_cache, model, tok, texts):
    assert [e["example_id"] for e in fp32_cache] == [str(i) for i in range(24)]  # example_id = input row index
    formula_checked = 0
    for ex in fp32_cache:
        ids = ids_of(tok, texts[int(ex["example_id"])])
        np.testing.assert_array_equal(ex["input_ids"], ids)
        T = len(ids)
        assert ex["loss_mask"].shape == (T - 1,) and ex["loss_mask"].all()  # format text: every target counts
        assert ex["topk_ids"].shape == (T - 1, 8) and ex["topk_logprobs"].shape == (T - 1, 8)

        logp = ref_logprobs(model, ids)
        values, index = logp.topk(8, dim=-1)
        np.testing.assert_array_equal(ex["topk_ids"], index.numpy())
        np.testing.assert_allclose(ex["topk_logprobs"], values.numpy(), atol=LOGPROB_TOL, rtol=0)
        assert (np.diff(ex["topk_logprobs"], axis=1) <= 0).all()  # most likely first

        # The tail is the log of the mass outside the top-k.
        outside = logp.scatter(-1, index, float("-inf"))
        # tail = lse(outside) - lse(all): each a p-weighted mean of the logits' errors, so within LOGPROB_TOL (+ rtol)
        np.testing.assert_allclose(ex["tail_logprob"], torch.logsumexp(outside, -1).numpy(), atol=LOGPROB_TOL, rtol=1e-5)
        topk = ex["topk_logprobs"].astype(np.float64)
        tail = ex["tail_logprob"].astype(np.float64)
        total = np.logaddexp(np.logaddexp.reduce(topk, axis=1), tail)
        # Top-k plus tail is the whole distribution, within one forward: sum(exp(log_softmax)) = 1 + eps1, eps1 <=
        # V * 2^-24 (the fp32 lse's 107-term sum) + 2^-24 * ln V (rounding of z - lse) = 6.7e-6; the tail's own 99-term
        # logsumexp adds <= 99 * 2^-24 = 5.9e-6. Together 1.3e-5 <= 2e-5.
        np.testing.assert_allclose(total, 0.0, atol=2e-5)
        # log1p(-sum exp(topk)) = log(m - eps1) for tail mass m: off by eps1 / m + 5.9e-6 <= 1e-3 for m >= 7.4e-3 (tail
        # > -4.9); below that eps1 (up to 6.7e-6 on any CPU) dominates the difference, and -7 allowed 7e-3.
        wide = tail > -4.9
        formula = np.log1p(-np.exp(topk).sum(axis=1))
        np.testing.assert_allclose(tail[wide], formula[wide], atol=1e-3)
        formula_checked += int(wide.sum())

        nll, ent = ref_stats(logp, ids, ex["loss_mask"])
        assert ex["teacher_nll"] == pytest.approx(nll, **stats_tol(ent)["nll"])
        assert ex["teacher_entropy"] == pytest.approx(ent, **stats_tol(ent)["ent"])
        assert ex["num_loss_tokens"] == T - 1
    assert formula_checked > 50  # the tail formula was exercised on real mass, not only on ~0 tails


def test_fp16_codec_within_half_precision(fp32_cache, tiny_teacher, text_jsonl, tmp_path):
    half = run(tiny_teacher, tmp_path / "fp16", text_jsonl, top_k=8, data={"max_length": 64, "max_rows": 24})
    m = read_manifest(tmp_path / "fp16")
    assert m.signals["topk"]["columns"]["topk_logprobs"]["codec"] == "fp16"
    assert pq.ParquetFile(tmp_path / "fp16" / m.shards[0].name).schema_arrow.field("topk_logprobs").type == pa.list_(pa.float16())
    assert len(half) == len(fp32_cache)
    for h, f in zip(half, fp32_cache):
        np.testing.assert_array_equal(h["topk_ids"], f["topk_ids"])
        # IEEE half: relative error <= 2^-11, plus a little for subnormals near 0.
        np.testing.assert_allclose(h["topk_logprobs"], f["topk_logprobs"], rtol=2**-10, atol=1e-6)
        assert not np.array_equal(h["topk_logprobs"], f["topk_logprobs"]) or f["topk_logprobs"].size < 4
        np.testing.assert_allclose(h["tail_logprob"], f["tail_logprob"], atol=1e-5, rtol=0)  # tail stays fp32


def test_batch_size_does_not_change_content(fp32_cache, tiny_teacher, text_jsonl, tmp_path):
    small = run(tiny_teacher, tmp_path / "small", text_jsonl, top_k=8, logprob_codec="fp32", batch_tokens=100,
                data={"max_length": 64, "max_rows": 24})
    assert_same_cache(small, fp32_cache)


def test_top_k_equal_to_vocab_has_no_tail(tiny_teacher, text_jsonl, tok, tmp_path):
    V = len(tok)
    exs = run(tiny_teacher, tmp_path / "full", text_jsonl, top_k=V, logprob_codec="fp32", data={"max_length": 16, "max_rows": 3})
    assert read_manifest(tmp_path / "full").top_k == V
    for ex in exs:
        assert np.isneginf(ex["tail_logprob"]).all()
        assert all(sorted(row) == list(range(V)) for row in ex["topk_ids"].tolist())  # a permutation of the vocab
        np.testing.assert_allclose(np.logaddexp.reduce(ex["topk_logprobs"].astype(np.float64), axis=1), 0.0, atol=1e-5)


def test_top_k_larger_than_vocab_is_config_error(tiny_teacher, text_jsonl, tok, tmp_path):
    V = len(tok)
    with pytest.raises(ConfigError, match=rf"vocabulary \({V}\).*--top-k {V}"):
        generate(make_cfg(tiny_teacher, tmp_path / "c", text_jsonl, top_k=V + 1), progress=False)
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------------------
# hidden states


def test_hidden_layers_match_hidden_states(tiny_teacher, text_jsonl, model, tmp_path):
    """Every layer, the middle one included, equals transformers' own hidden_states (the reference), though
    the backend hooks only the chosen layers; the manifest says what each stored tensor is."""
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    exs = run(tiny_teacher, tmp_path / "h", text_jsonl, top_k=4, hidden_layers=[0, 1, -1], hidden_codec="fp32",
              data={"max_length": 48, "max_rows": 5})
    m = read_manifest(tmp_path / "h")
    assert m.signals["hidden"]["layers"] == [0, 1, L] and m.signals["hidden"]["size"] == H
    tensors = m.settings["scoring"]["hidden_tensors"]
    assert "embedding" in tensors["0"] and "block 1" in tensors["1"] and "final norm" in tensors[str(L)]
    for ex in exs:
        assert {k for k in ex if k.startswith("hidden_")} == {"hidden_0", "hidden_1", f"hidden_{L}"}
        with torch.no_grad():
            hs = model(input_ids=torch.as_tensor(ex["input_ids"].astype(np.int64))[None], output_hidden_states=True).hidden_states
        T = len(ex["input_ids"])
        for layer in (0, 1, L):
            got = ex[f"hidden_{layer}"].reshape(T, H)  # stored row-major [T, H]
            np.testing.assert_allclose(got, hs[layer][0].numpy(), atol=1e-4, rtol=1e-4)
        assert not np.allclose(ex["hidden_0"].reshape(T, H), ex[f"hidden_{L}"].reshape(T, H))


def test_only_the_chosen_layers_are_captured(tiny_teacher):
    """The hook path is the one used for a Llama teacher (no fallback), and a forward keeps the chosen
    layers' tensors only: output_hidden_states is off."""
    from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher

    teacher = TransformersTeacher(str(tiny_teacher), device="cpu", dtype="float32")
    teacher.load()
    assert teacher._layer_modules is not None
    calls = []
    decoder = teacher.model.get_decoder()
    original = decoder.forward
    decoder.forward = lambda *a, **k: calls.append(k.get("output_hidden_states")) or original(*a, **k)
    try:
        out = teacher.score([np.arange(1, 9)], 4, [1])
    finally:
        decoder.forward = original
    assert calls == [False] and set(k for k in out[0] if k.startswith("hidden_")) == {"hidden_1"}


@pytest.mark.parametrize("layer", [3, -4])
def test_hidden_layer_out_of_range(tiny_teacher, text_jsonl, tmp_path, layer):
    with pytest.raises(ConfigError, match=r"out of range.*0\.\.2"):
        generate(make_cfg(tiny_teacher, tmp_path / "c", text_jsonl, hidden_layers=[layer]), progress=False)
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------------------
# row formats


def _chat_flags(tok, messages) -> tuple[list[int], list[bool]]:
    """Token ids of a chat rendered with the conftest template, and which tokens are assistant output.

    The word-level tokenizer makes the rendering a plain concatenation of per-message segments
    ``<|im_start|> role content... <|im_end|>``, so this is independent of kdcache's own logic.
    """
    ids, flags = [], []
    for m in messages:
        seg = ids_of(tok, f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n", special=False)
        ids += seg
        flags += [False, False] + [m["role"] == "assistant"] * (len(seg) - 2)
    return ids, flags


def test_messages_loss_only_on_assistant_tokens(tiny_teacher, tok, model, tmp_path):
    convs = [
        [{"role": "user", "content": "the value of this"}, {"role": "assistant", "content": "returns a list of string"}],
        [{"role": "system", "content": "python code"}, {"role": "user", "content": "what is the file"},
         {"role": "assistant", "content": "it is data"}, {"role": "user", "content": "and the name"},
         {"role": "assistant", "content": "the name is first"}],
    ]
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    exs = run(tiny_teacher, tmp_path / "c", src, top_k=4, logprob_codec="fp32", data={"field": "messages"})
    assert [e["example_id"] for e in exs] == ["0", "1"]
    im_end = tok.convert_tokens_to_ids(IM_END)
    for ex, conv in zip(exs, convs):
        ids, flags = _chat_flags(tok, conv)
        assert ids == chat_ids(tok, conv)
        np.testing.assert_array_equal(ex["input_ids"], ids)
        np.testing.assert_array_equal(ex["loss_mask"], flags[1:])  # target t+1 counts iff it is assistant output
        targets = np.asarray(ids[1:])[ex["loss_mask"]].tolist()
        want = []
        for m in conv:
            if m["role"] == "assistant":
                want += ids_of(tok, m["content"], special=False) + [im_end]
        assert targets == want  # includes each <|im_end|>, nothing of the user turns
        assert ex["num_loss_tokens"] == len(want)
        nll, ent = ref_stats(ref_logprobs(model, ids), ids, ex["loss_mask"])
        assert ex["teacher_nll"] == pytest.approx(nll, **stats_tol(ent)["nll"])
        assert ex["teacher_entropy"] == pytest.approx(ent, **stats_tol(ent)["ent"])


def test_messages_auto_format_suggests_field(tiny_teacher, tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match="--field messages"):
        generate(make_cfg(tiny_teacher, tmp_path / "c", src), progress=False)
    assert not (tmp_path / "c").exists()


def test_messages_without_chat_template_is_data_error(tiny_teacher, tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match="chat template"):
        generate(make_cfg(tiny_teacher, tmp_path / "c", src, data={"field": "messages", "chat_template": False}), progress=False)
    assert not (tmp_path / "c").exists()


PAIRS = [("the value of this", "returns a list"), ("what is the class name", "it is the first object of the module")]


def test_prompt_response_with_chat_template(tiny_teacher, tok, tmp_path):
    src = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    exs = run(tiny_teacher, tmp_path / "c", src, top_k=4)  # format auto -> prompt_response
    assert read_manifest(tmp_path / "c").settings["dataset"]["format"] == "auto"
    for ex, (p, r) in zip(exs, PAIRS):
        conv = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        ids, flags = _chat_flags(tok, conv)
        np.testing.assert_array_equal(ex["input_ids"], ids)
        np.testing.assert_array_equal(ex["loss_mask"], flags[1:])
        resp = ids_of(tok, r, special=False) + [tok.convert_tokens_to_ids(IM_END)]
        assert np.asarray(ids[1:])[ex["loss_mask"]].tolist() == resp


def test_prompt_response_without_chat_template(tiny_teacher, tok, tmp_path):
    src = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    exs = run(tiny_teacher, tmp_path / "c", src, top_k=4, data={"chat_template": False})
    for ex, (p, r) in zip(exs, PAIRS):
        pi, ri = ids_of(tok, p), ids_of(tok, r, special=False) + [tok.eos_token_id]
        assert IM_START not in tok.convert_ids_to_tokens(ex["input_ids"].tolist())  # no template rendering
        np.testing.assert_array_equal(ex["input_ids"], pi + ri)
        want = np.zeros(len(pi) + len(ri) - 1, dtype=bool)
        want[len(pi) - 1 :] = True  # targets from the first response token on
        np.testing.assert_array_equal(ex["loss_mask"], want)
        assert ex["num_loss_tokens"] == len(ri)


def _word_rows(lengths: list[int]) -> list[dict]:
    return [{"text": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n))} for i, n in enumerate(lengths)]


def test_truncation_truncate_counts_rows(tiny_teacher, tok, tmp_path):
    rows = _word_rows([4, 12, 6, 20, 9])
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    exs = run(tiny_teacher, tmp_path / "c", src, top_k=4, data={"max_length": 10, "truncation": "truncate"})
    assert [e["example_id"] for e in exs] == ["0", "1", "2", "3", "4"]
    for ex, row in zip(exs, rows):
        full = ids_of(tok, row["text"])
        np.testing.assert_array_equal(ex["input_ids"], full[:10])
        assert len(ex["loss_mask"]) == len(ex["input_ids"]) - 1
    stats = read_manifest(tmp_path / "c").stats
    assert stats.get("truncated_rows") == 2
    assert not any(k.startswith("bad_rows") for k in stats)


def test_truncation_skip_counts_too_long(tiny_teacher, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", _word_rows([4, 12, 6, 20, 9]))
    exs = run(tiny_teacher, tmp_path / "c", src, top_k=4, data={"max_length": 10, "truncation": "skip"})
    assert [e["example_id"] for e in exs] == ["0", "2", "4"]  # ids stay input row indices
    stats = read_manifest(tmp_path / "c").stats
    assert stats.get("bad_rows.too_long") == 2
    assert "truncated_rows" not in stats


BAD_ROWS = [
    {"text": "the first line of text"},
    {"other": "the field is missing"},  # missing_field (row 1)
    {"text": ""},  # empty
    {"text": "   "},  # empty
    {"text": 5},  # wrong_type
    {"text": ["a", "list"]},  # wrong_type
    {"text": None},  # missing_field
    {"text": "the last line of text"},
]


def test_bad_rows_are_counted_by_reason(tiny_teacher, tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    exs = run(tiny_teacher, tmp_path / "c", src, top_k=4)
    assert [e["example_id"] for e in exs] == ["0", "7"]
    stats = read_manifest(tmp_path / "c").stats
    assert {k: v for k, v in stats.items() if k.startswith("bad_rows.")} == {
        "bad_rows.missing_field": 2, "bad_rows.empty": 2, "bad_rows.wrong_type": 2,
    }


def test_strict_fails_on_first_bad_row(tiny_teacher, tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    with pytest.raises(DataError, match=r"bad row 1\b.*missing_field.*--strict"):
        generate(make_cfg(tiny_teacher, tmp_path / "c", src, top_k=4, data={"strict": True}), progress=False)
    assert not (tmp_path / "c").exists()  # nothing committed: no half-made cache


def test_all_rows_bad_is_data_error(tiny_teacher, tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"text": ""}, {"text": 3}, {"other": "x"}])
    with pytest.raises(DataError, match="no usable rows"):
        generate(make_cfg(tiny_teacher, tmp_path / "c", src, top_k=4), progress=False)
    assert not (tmp_path / "c").exists()


def test_mistyped_field_lists_available_fields(tiny_teacher, text_jsonl, tmp_path):
    with pytest.raises(DataError, match=r"'txt' not in dataset.*\['text'\]"):
        generate(make_cfg(tiny_teacher, tmp_path / "c", text_jsonl, data={"field": "txt"}), progress=False)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "name, content",
    [("blank.jsonl", "\n"), ("header-only.csv", "text\n"), ("empty.txt", ""), ("empty.jsonl", ""), ("empty.csv", "")],
)
def test_empty_dataset_is_data_error(tiny_teacher, tmp_path, name, content):
    src = tmp_path / name
    src.write_text(content)
    with pytest.raises(DataError, match="empty|no rows"):
        generate(make_cfg(tiny_teacher, tmp_path / "c", src), progress=False)
    assert not (tmp_path / "c").exists()


def test_malformed_line_is_data_error(tiny_teacher, tmp_path):
    """A broken JSON line in the middle of a file is the user's data problem: a DataError, not a traceback."""
    src = tmp_path / "broken.jsonl"
    src.write_text(json.dumps({"text": "the a of"}) + "\n{not json\n" + json.dumps({"text": "the of to"}) + "\n")
    with pytest.raises(DataError, match="broken.jsonl"):
        generate(make_cfg(tiny_teacher, tmp_path / "c", src, top_k=4), progress=False)
    assert not (tmp_path / "c").exists()


def test_jsonl_csv_parquet_txt_inputs_agree(tiny_teacher, tok, tmp_path):
    sents = _sentences(6, seed=3)
    files = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", [{"text": s} for s in sents]),
        "csv": tmp_path / "d.csv",
        "parquet": tmp_path / "d.parquet",
        "txt": tmp_path / "d.txt",
    }
    with open(files["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "n"])
        w.writerows([s, i] for i, s in enumerate(sents))
    pq.write_table(pa.table({"text": sents, "n": list(range(6))}), files["parquet"])
    files["txt"].write_text("".join(s + "\n" for s in sents))
    want = [ids_of(tok, s) for s in sents]
    for kind, src in files.items():
        exs = run(tiny_teacher, tmp_path / f"c-{kind}", src, top_k=4)
        assert [e["example_id"] for e in exs] == [str(i) for i in range(6)], kind
        assert [e["input_ids"].tolist() for e in exs] == want, kind


# --------------------------------------------------------------------------------------------------
# teacher continuations


def _greedy(model, prompt, max_new_tokens, eos) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(np.asarray(prompt, dtype=np.int64))[None], max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=1, eos_token_id=eos)
    cont = out[0, len(prompt):].tolist()
    return cont[: cont.index(eos) + 1] if eos in cont else cont


def test_greedy_continuations(tiny_teacher, tok, model, tmp_path):
    pairs = PAIRS + [("the name of the data", "none")]
    src = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": p, "response": r} for p, r in pairs])
    exs = run(tiny_teacher, tmp_path / "c", src, top_k=4, logprob_codec="fp32", data={"max_length": 64},
              generation={"enabled": True, "max_new_tokens": 6})
    assert [e["example_id"] for e in exs] == ["0#g0", "1#g0", "2#g0"]
    assert "generation" in read_manifest(tmp_path / "c").signals
    for ex, (p, _) in zip(exs, pairs):
        prompt = chat_ids(tok, [{"role": "user", "content": p}], add_generation_prompt=True)  # ends with "<|im_start|>assistant"
        plen = len(prompt)
        assert ex["prompt_length"] == plen and ex["sample_index"] == 0
        np.testing.assert_array_equal(ex["input_ids"][:plen], prompt)
        assert ex["input_ids"][plen:].tolist() == _greedy(model, prompt, 6, tok.eos_token_id)  # the teacher's own words
        want = np.zeros(len(ex["input_ids"]) - 1, dtype=bool)
        want[plen - 1 :] = True  # loss only on the continuation
        np.testing.assert_array_equal(ex["loss_mask"], want)
        # The continuation rows are scored like any other row.
        logp = ref_logprobs(model, ex["input_ids"])
        np.testing.assert_allclose(ex["topk_logprobs"], logp.topk(4, dim=-1).values.numpy(), atol=LOGPROB_TOL, rtol=0)
        assert ex["teacher_nll"] == pytest.approx(ref_stats(logp, ex["input_ids"], want)[0], abs=LOGPROB_TOL, rel=0)


def test_sampled_continuations(tiny_teacher, text_jsonl, tmp_path):
    gen = {"enabled": True, "max_new_tokens": 8, "num_samples": 2, "do_sample": True}
    kw = dict(top_k=4, data={"max_length": 64, "max_rows": 4}, generation=gen, seed=7)
    exs = run(tiny_teacher, tmp_path / "a", text_jsonl, **kw)
    assert [e["example_id"] for e in exs] == [f"{i}#g{j}" for i in range(4) for j in range(2)]
    assert [e["sample_index"] for e in exs] == [0, 1] * 4
    for a, b in zip(exs[::2], exs[1::2]):  # text rows: the whole row is the prompt, both samples share it
        plen = a["prompt_length"]
        assert b["prompt_length"] == plen and len(a["input_ids"]) > plen
        np.testing.assert_array_equal(a["input_ids"][:plen], b["input_ids"][:plen])
        assert not a["loss_mask"][: plen - 1].any() and a["loss_mask"][plen - 1 :].all()
    assert any(a["input_ids"].tolist() != b["input_ids"].tolist() for a, b in zip(exs[::2], exs[1::2]))  # really sampled
    again = run(tiny_teacher, tmp_path / "b", text_jsonl, **kw)
    assert [e["input_ids"].tolist() for e in again] == [e["input_ids"].tolist() for e in exs]  # seeded


def test_sampled_continuations_do_not_depend_on_batching(tiny_teacher, text_jsonl, tmp_path):
    """The samples of a row must be a function of (seed, row) only.

    batch_tokens is not part of the cache settings (a resume may use another one), and a resume starts
    its batches at the first uncommitted row; if the samples depend on which rows share a batch, a
    resumed sampled cache differs from an uninterrupted one and the recorded seed does not reproduce it.
    """
    gen = {"enabled": True, "max_new_tokens": 8, "num_samples": 2, "do_sample": True}
    kw = dict(top_k=4, data={"max_length": 64, "max_rows": 6}, generation=gen, seed=7)
    one_by_one = run(tiny_teacher, tmp_path / "small", text_jsonl, batch_tokens=64, **kw)
    together = run(tiny_teacher, tmp_path / "large", text_jsonl, batch_tokens=4096, **kw)
    assert read_manifest(tmp_path / "small").settings_hash == read_manifest(tmp_path / "large").settings_hash
    assert [e["input_ids"].tolist() for e in one_by_one] == [e["input_ids"].tolist() for e in together]


def test_generation_rows_without_room_are_counted(tiny_teacher, tmp_path):
    """A prompt that already fills max_length leaves no room for a continuation: the row yields nothing,
    and like every other dropped row it must show up in manifest.stats under bad_rows.<reason>."""
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "the a of"}, {"text": " ".join(["the"] * 20)}, {"text": "of to in"}])
    exs = run(tiny_teacher, tmp_path / "c", src, top_k=4, data={"max_length": 8}, generation={"enabled": True, "max_new_tokens": 4})
    assert [e["example_id"] for e in exs] == ["0#g0", "2#g0"]
    stats = read_manifest(tmp_path / "c").stats
    assert sum(v for k, v in stats.items() if k.startswith("bad_rows.")) == 1, stats


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (2.0, 0.7)])
def test_batched_sampling_draws_from_the_tempered_nucleus(tiny_teacher, tok, model, temperature, top_p):
    """All rows decode in one batch, each from its own seed: the first tokens of many rows with one prompt
    follow softmax(logits / T) restricted to the top-p nucleus, and tokens outside it never appear."""
    from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher

    teacher = TransformersTeacher(str(tiny_teacher), device="cpu", dtype="float32")
    teacher.load()
    prompt = np.asarray(ids_of(tok, "the value of the"))
    rows = 6000
    cfg = GenerationConfig(enabled=True, do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=1)
    first = np.array([samples[0][0] for samples in teacher.generate([prompt] * rows, cfg, seeds=list(range(rows)))])
    with torch.no_grad():
        p = torch.softmax(model(torch.as_tensor(prompt)[None]).logits[0, -1].double() / temperature, dim=-1)
    srt, order = p.sort(descending=True)
    keep = order[(srt.cumsum(0) - srt) < top_p]
    q = torch.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    assert (q > 0.02).sum() >= 3  # a real choice among several tokens
    if top_p < 1.0:
        assert p[q == 0].sum() > 0.05  # and the nucleus really cuts mass away
    freq = np.bincount(first, minlength=len(q)) / rows
    assert 0.5 * np.abs(freq - q.numpy()).sum() < 0.04
    assert freq[(q == 0).numpy()].sum() == 0


def test_prompt_tokens_cut_text_rows_to_a_prefix(tiny_teacher, tok, model, text_jsonl, tmp_path):
    """Sequence-level KD on plain text: the teacher continues the first N tokens of each row, not the whole row."""
    rows = [json.loads(line)["text"] for line in text_jsonl.read_text().splitlines()[:4]]
    exs = run(tiny_teacher, tmp_path / "c", text_jsonl, top_k=4, data={"max_length": 64, "max_rows": 4},
              generation={"enabled": True, "max_new_tokens": 5, "prompt_tokens": 3})
    for ex, text in zip(exs, rows):
        prompt = ids_of(tok, text)[:3]
        assert ex["prompt_length"] == len(prompt) == 3
        np.testing.assert_array_equal(ex["input_ids"][:3], prompt)
        assert ex["input_ids"][3:].tolist() == _greedy(model, prompt, 5, tok.eos_token_id)
        assert not ex["loss_mask"][:2].any() and ex["loss_mask"][2:].all()
    with pytest.raises(ConfigError, match="prompt_tokens"):
        GenerationConfig(enabled=True, prompt_tokens=-1)


def test_multiple_greedy_samples_rejected():
    with pytest.raises(ConfigError, match="do_sample"):
        GenerationConfig(enabled=True, num_samples=2, do_sample=False)


# --------------------------------------------------------------------------------------------------
# resume


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    from kdcache.pipeline.config import DataConfig, GenerateConfig
    from kdcache.pipeline.generate import generate
    teacher, out, src = sys.argv[1:4]
    generate(GenerateConfig(teacher=teacher, out=out, device="cpu", top_k=4, logprob_codec="fp32", batch_tokens=512,
                            shard_tokens=400, row_group_tokens=200, data=DataConfig(source=src, max_length=48)),
             progress=False)
    """
)


def test_resume_after_sigkill_equals_uninterrupted_run(tiny_teacher, tmp_path):
    rows = [{"text": s} for s in _sentences(150, seed=11)]
    for i in range(5, 150, 37):
        rows[i] = {"text": ""}  # bad rows: their counts must survive the crash too
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "resumed"
    script = tmp_path / "gen.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_teacher), str(out), str(src)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / MANIFEST_NAME
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(manifest.read_text())["shards"]:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.002)
        assert proc.poll() is None, f"generate ended before a shard was seen: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    crashed = read_manifest(out)
    assert crashed.status == "in_progress" and crashed.shards
    assert 0 < crashed.shards[-1].input_rows_end < 150  # really interrupted mid-way

    kw = dict(top_k=4, logprob_codec="fp32", batch_tokens=512, shard_tokens=400, row_group_tokens=200, data={"max_length": 48})
    resumed = run(tiny_teacher, out, src, **kw)
    whole = run(tiny_teacher, tmp_path / "whole", src, **kw)
    good = [str(i) for i, r in enumerate(rows) if r["text"]]
    assert [e["example_id"] for e in resumed] == good  # every row exactly once, in order
    assert_same_cache(resumed, whole)
    m, w = read_manifest(out), read_manifest(tmp_path / "whole")
    assert m.status == "complete" and m.num_rows == len(good) == w.num_rows and m.num_tokens == w.num_tokens
    assert m.stats == w.stats == {"bad_rows.empty": len(rows) - len(good)}
    on_disk = sorted(p.name for p in out.iterdir() if "part-" in p.name)
    assert on_disk == sorted(s.name for s in m.shards)  # no stray temporary or orphaned shards


def test_rerun_of_complete_cache_is_noop(tiny_teacher, text_jsonl, tmp_path):
    out = tmp_path / "c"
    kw = dict(top_k=4, data={"max_rows": 8}, shard_tokens=64, row_group_tokens=32)
    run(tiny_teacher, out, text_jsonl, **kw)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    time.sleep(0.01)
    m = generate(make_cfg(tiny_teacher, out, text_jsonl, **kw), progress=False)
    assert m.status == "complete" and m.num_rows == 8
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    assert after == before


def test_different_settings_need_overwrite(tiny_teacher, text_jsonl, tmp_path):
    out = tmp_path / "c"
    run(tiny_teacher, out, text_jsonl, top_k=8, data={"max_rows": 6})
    with pytest.raises(CacheMismatchError, match=r"top_k.*--overwrite"):
        generate(make_cfg(tiny_teacher, out, text_jsonl, top_k=4, data={"max_rows": 6}), progress=False)
    assert read_manifest(out).top_k == 8  # untouched
    exs = run(tiny_teacher, out, text_jsonl, top_k=4, overwrite=True, data={"max_rows": 6})
    m = read_manifest(out)
    assert m.top_k == 4 and m.status == "complete" and len(exs) == 6
    assert all(e["topk_ids"].shape[1] == 4 for e in exs)
    assert sorted(p.name for p in out.iterdir() if "part-" in p.name) == sorted(s.name for s in m.shards)


# --------------------------------------------------------------------------------------------------
# user errors


def test_missing_model_path(text_jsonl, tmp_path):
    with pytest.raises(ConfigError, match=r"teacher .*nope.* not found.*--teacher"):
        generate(make_cfg(tmp_path / "nope", tmp_path / "c", text_jsonl), progress=False)
    assert not (tmp_path / "c").exists()


def test_no_teacher_or_out_given(text_jsonl, tmp_path):
    with pytest.raises(ConfigError, match="--teacher"):
        generate(make_cfg("", tmp_path / "c", text_jsonl), progress=False)
    with pytest.raises(ConfigError, match="--out"):
        generate(make_cfg(tmp_path, "", text_jsonl), progress=False)


def test_unknown_backend_lists_valid_ones(tiny_teacher, text_jsonl, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown teacher backend 'vllmx'.*valid backends: .*transformers"):
        generate(make_cfg(tiny_teacher, tmp_path / "c", text_jsonl, backend="vllmx"), progress=False)


def test_text_file_as_teacher(text_jsonl, tmp_path):
    f = tmp_path / "model.txt"
    f.write_text("not a model")
    with pytest.raises(ConfigError, match=r"model\.txt is a file but not a \.gguf"):
        generate(make_cfg(f, tmp_path / "c", text_jsonl), progress=False)


def test_output_path_is_a_file(tiny_teacher, text_jsonl, tmp_path):
    f = tmp_path / "out"
    f.write_text("keep me")
    with pytest.raises(KDCacheError, match=r"output directory .*out.*choose another --out"):
        generate(make_cfg(tiny_teacher, f, text_jsonl, data={"max_rows": 2}), progress=False)
    assert f.read_text() == "keep me"


def test_output_dir_with_foreign_files(tiny_teacher, text_jsonl, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CacheMismatchError, match="not empty"):
        generate(make_cfg(tiny_teacher, out, text_jsonl, data={"max_rows": 2}), progress=False)
    assert (out / "notes.txt").read_text() == "mine"
