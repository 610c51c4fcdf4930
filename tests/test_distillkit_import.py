"""`kdcache import`: DistillKit logit datasets as caches (kdcache/cache/distillkit.py).

Files are built here: by hand from the format's description (bytes with struct, bit strings with format(), so
the encoder and decoder cannot share a bug) and with the module's encoder from float64 references, whose
decoded values must lie within the error the format's lossy parts allow. Then the produced cache opens,
verifies, trains a tiny student, reruns without work and resumes after an interruption.
"""

from __future__ import annotations

import json
import math
import struct
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner

from kdcache.cache import open_cache, verify_cache
from kdcache.cache.distillkit import import_distillkit
from kdcache.cache.distillkit_format import (
    DistillKitConfig,
    decode_ids,
    decode_logprobs,
    encode_positions,
    pack_bits,
    unpack_bits,
    with_tail,
    write_distillkit,
)
from kdcache.cli import main
from kdcache.errors import CacheMismatchError, ConfigError, DataError

RECOMMENDED = {"k": 128, "exact_k": 16, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"], "term_dtype": "float32",
               "residual_bins": [], "delta_encoding": False, "error_diffusion": False}  # DistillKit README: "used at Arcee for new captures"
QWEN_README = {"k": 128, "exact_k": 32, "exact_dtype": "float32", "polynomial_terms": [0, 1, 2], "term_dtype": "float32",
               "residual_bins": [], "delta_encoding": True, "error_diffusion": False}  # its offline example (Qwen3-235B dataset)
BUDGET = {"k": 50, "exact_k": 1, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, "sqrt"], "term_dtype": "float32",
          "residual_bins": [], "delta_encoding": False}
BINS = {"k": 64, "exact_k": 8, "exact_dtype": "float16", "polynomial_terms": [0, 1, "sqrt"], "term_dtype": "float32", "normalize_t": True,
        "residual_bins": [{"scale_dtype": "float16", "element_bits": 8, "num_elements": 16},
                          {"scale_dtype": "bfloat16", "element_bits": 3, "num_elements": 24},
                          {"scale_dtype": "float32", "element_bits": 1, "num_elements": 8}], "delta_encoding": True}
BINS_ONLY = {"k": 16, "exact_k": 4, "exact_dtype": "float32", "residual_bins": [{"scale_dtype": "float32", "element_bits": 12, "num_elements": 12}],
             "delta_encoding": False}


def _cfg(base: dict, d: int) -> DistillKitConfig:
    return DistillKitConfig.from_mapping({**base, "d": d})


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference(rng, P: int, V: int, k: int, scale: float = 4.0):
    """Dense float64 log-probs of random logits: (top-k ids, top-k log-probs, log of the true mass outside them)."""
    lsm = _log_softmax(rng.standard_normal((P, V)) * scale)
    order = np.argsort(-lsm, axis=1, kind="stable")[:, :k]
    lp = np.take_along_axis(lsm, order, 1)
    outside = np.exp(lsm).sum(1) - np.exp(lp).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):  # k = V: nothing outside
        return order, lp, np.log(outside)


def _rows(rng, n: int, V: int, k: int, lengths=(5, 30), packed: bool = False, scale: float = 4.0) -> list[dict]:
    """Rows as DistillKit's capture writes them (P = T - 1), or as its packing leaves them (P = T): the next token
    is drawn from the teacher, so it is usually in the top-k."""
    rows = []
    for i in range(n):
        T = int(rng.integers(*lengths))
        lsm = _log_softmax(rng.standard_normal((T, V)) * scale)
        tokens = [int(rng.integers(V))]
        for t in range(T - 1):
            tokens.append(int(rng.choice(V, p=np.exp(lsm[t]) / np.exp(lsm[t]).sum())))
        P = T if packed else T - 1
        order = np.argsort(-lsm[:P], axis=1)[:, :k]
        rows.append({"input_ids": tokens, "topk_ids": order, "topk_logprobs": np.take_along_axis(lsm[:P], order, 1), "id": f"doc-{i}"})
    return rows


def _stream(path) -> list[dict]:
    return list(open_cache(path).stream())


# --------------------------------------------------------------------------- by hand, from the spec
def _hand_table(raw: bytes, ids: bytes, tokens: list[int]) -> pa.Table:
    """One row, one position per token but the last, built with pyarrow alone."""
    P = len(tokens) - 1
    return pa.table({"input_ids": pa.array([tokens], pa.list_(pa.uint64())),
                     "compressed_logprobs": pa.array([[list(raw)] * P], pa.list_(pa.list_(pa.uint8()))),
                     "bytepacked_indices": pa.array([[list(ids)] * P], pa.list_(pa.list_(pa.uint8())))})


HAND_1 = dict(  # delta encoding, float32 exact, one float16 constant term, a 4-bit bin with a float16 scale, 3-bit ids
    config={"d": 5, "k": 3, "exact_k": 1, "exact_dtype": "float32", "polynomial_terms": [0], "term_dtype": "float16",
            "residual_bins": [{"scale_dtype": "float16", "element_bits": 4, "num_elements": 2}], "delta_encoding": True},
    # v0 = -0.5 (exact); fit c0 = -1; scale 0.25; residuals +0.25, -0.5 -> steps +1, -2 -> codes 9, 6 (offset 8) -> 1001 0110
    raw=struct.pack("<f", -0.5) + struct.pack("<e", -1.0) + struct.pack("<e", 0.25) + bytes([0b1001_0110]),
    # deltas -0.5, -1 + 0.25, -1 - 0.5 -> cumulative -0.5, -1.25, -2.75
    logprobs=[-0.5, -1.25, -2.75],
    ids=[4, 0, 2], id_bytes=bytes([0b100_000_01, 0b0_0000000]),
)
HAND_2 = dict(  # no delta, bfloat16 exact, [1, sqrt] at t = 0, 0.5, 1 (normalize_t), a 1-bit bin with a float32 scale, 9-bit ids
    config={"d": 300, "k": 5, "exact_k": 2, "exact_dtype": "bfloat16", "polynomial_terms": [0, "sqrt"], "term_dtype": "float32",
            "normalize_t": True, "residual_bins": [{"scale_dtype": "float32", "element_bits": 1, "num_elements": 2}], "delta_encoding": False},
    # bf16 -0.5 = 0xBF00, -1.5 = 0xBFC0; fit -3 - 2 sqrt(t) = [-3, -3 - sqrt(2), -5]; 1-bit codes 1, 0 at scale 0.5 -> +0.5, -0.5;
    # the fifth value has no bin (residual 0)
    raw=bytes([0x00, 0xBF, 0xC0, 0xBF]) + struct.pack("<ff", -3.0, -2.0) + struct.pack("<f", 0.5) + bytes([0b10_000000]),
    logprobs=[-0.5, -1.5, -2.5, -3.0 - math.sqrt(2.0) - 0.5, -5.0],
    ids=[299, 7, 256, 1, 42],
    id_bytes=int("".join(format(i, "09b") for i in [299, 7, 256, 1, 42]).ljust(48, "0"), 2).to_bytes(6, "big"),
)


@pytest.mark.parametrize("case", [HAND_1, HAND_2], ids=["delta-fp16-bin4", "bf16-sqrt-bin1"])
def test_hand_built_bytes_decode_to_the_spec(case, tmp_path):
    cfg = DistillKitConfig.from_mapping(case["config"])
    assert cfg.logprob_bytes == len(case["raw"]) and cfg.index_bytes == len(case["id_bytes"])
    got = decode_logprobs(cfg, np.frombuffer(case["raw"], np.uint8)[None])
    np.testing.assert_allclose(got[0], case["logprobs"], rtol=1e-15, atol=0)  # every stored number is exact in its dtype
    np.testing.assert_array_equal(decode_ids(cfg, np.frombuffer(case["id_bytes"], np.uint8)[None])[0], case["ids"])
    # the encoder writes the same id bytes (its log-prob bytes differ: it fits its own coefficients)
    _, id_bytes = encode_positions(cfg, np.array([case["ids"]]), np.array([case["logprobs"]]))
    assert id_bytes.tobytes() == case["id_bytes"]

    # the same bytes through a whole import: 3 tokens, 2 positions; the token after each is ids[1] (in the top-k) then 3 (not)
    tokens = [0, case["ids"][1], 3]
    pq.write_table(_hand_table(case["raw"], case["id_bytes"], tokens), tmp_path / "hand.parquet")
    m = import_distillkit(tmp_path / "hand.parquet", tmp_path / "cache", case["config"], logprob_codec="fp32")
    assert m.status == "complete" and m.num_rows == 1 and m.num_tokens == 3
    (ex,) = _stream(tmp_path / "cache")
    p = np.exp(np.array(case["logprobs"]))
    tail = np.log(1 - p.sum())
    np.testing.assert_array_equal(ex["topk_ids"], [case["ids"]] * 2)
    np.testing.assert_allclose(ex["topk_logprobs"], [case["logprobs"]] * 2, rtol=2**-24)
    np.testing.assert_allclose(ex["tail_logprob"], [tail, tail], rtol=1e-6)
    # NLL: -log p of the rank-2 token, then of token 3, outside the top-k: the tail bucket's mass
    assert ex["teacher_nll"] == pytest.approx((-case["logprobs"][1] - tail) / 2, rel=1e-6)
    entropy = -(p * np.log(p)).sum() - (1 - p.sum()) * tail
    assert ex["teacher_entropy"] == pytest.approx(entropy, rel=1e-6)
    assert ex["num_loss_tokens"] == 2 and ex["loss_mask"].all() and ex["example_id"] == "0"


@pytest.mark.parametrize("d", [151_936, 262_144])
def test_hand_built_18_bit_ids(d):
    ids = [d - 1, 0, 131_072, 131_071, 77_777]  # ids above 2^17 need the 18th bit
    cfg = DistillKitConfig.from_mapping({**BUDGET, "d": d, "k": 5, "exact_k": 5})
    assert cfg.index_bits == 18 and cfg.index_bytes == 12  # 90 bits
    bits = "".join(format(i, "018b") for i in ids).ljust(96, "0")
    hand = int(bits, 2).to_bytes(12, "big")
    np.testing.assert_array_equal(decode_ids(cfg, np.frombuffer(hand, np.uint8)[None])[0], ids)
    assert pack_bits(np.array([ids], np.uint64), 18).tobytes() == hand


# --------------------------------------------------------------------------- encoder + decoder round trips
@pytest.mark.parametrize("d", [2, 5, 1000, 131_072, 131_073, 151_936, 262_144, 2**20])
def test_ids_round_trip_exactly(d):
    rng = np.random.default_rng(d)
    k = min(d, 64)
    ids = np.stack([rng.choice(d, size=k, replace=False) for _ in range(40)])
    ids[0, 0] = d - 1  # the largest id of the vocabulary
    cfg = DistillKitConfig.from_mapping({**BUDGET, "d": d, "k": k, "exact_k": k})
    lp = -np.sort(rng.exponential(2.0, size=ids.shape), axis=1) - 0.1
    _, packed = encode_positions(cfg, ids, lp)
    assert packed.shape == (40, (k * int(np.ceil(np.log2(d))) + 7) // 8)
    np.testing.assert_array_equal(decode_ids(cfg, packed), ids)


@pytest.mark.parametrize("bits", [1, 7, 33, 57, 58, 63, 64])
def test_bit_packing_round_trips_up_to_64_bits(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(9, 13), dtype=np.uint64, endpoint=False) if bits < 64 else \
        rng.integers(0, 2**63, size=(9, 13), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    codes[0, 0] = np.uint64(2**bits - 1)
    packed = pack_bits(codes, bits)
    assert packed.shape == (9, (13 * bits + 7) // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, 13), codes)


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 -> dtype -> float64 through torch (round to nearest even), independently of the module."""
    return torch.tensor(x, dtype=torch.float64).to(getattr(torch, dtype)).double().numpy()


UNIT = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def _error_bound(c: dict, lp: np.ndarray) -> np.ndarray:
    """Per-value bound of |decoded - reference| from the format's description: exact values rounded to their dtype;
    the fitted part off by the least-squares residual plus the coefficients' rounding, or inside a bin by one
    quantisation step of its scale (two for 1-bit bins, whose codes decode to +-scale only); deltas add up."""
    k, ek = c["k"], c["exact_k"]
    v = np.concatenate([lp[:, :1], np.diff(lp, axis=1)], 1) if c.get("delta_encoding", True) else lp
    err = np.zeros_like(v)
    err[:, :ek] = np.abs(v[:, :ek]) * UNIT[c.get("exact_dtype", "float32")] * 1.0001
    rest, n = v[:, ek:], k - ek
    terms = c.get("polynomial_terms") or []
    if terms:
        t = np.linspace(0, 1, n) if c.get("normalize_t") else np.arange(n, dtype=np.float64)
        X = np.stack([np.sqrt(t) if x == "sqrt" else np.exp(t) if x == "exp" else t**x for x in terms], -1)
        coef = np.linalg.lstsq(X, rest.T, rcond=None)[0].T
        coef_err = (np.abs(coef) * UNIT[c.get("term_dtype", "float32")] * 1.0001) @ np.abs(X).T
        resid = rest - coef @ X.T
    else:
        coef_err, resid = np.zeros_like(rest), rest
    err[:, ek:] = np.abs(resid) + coef_err
    at = 0
    for b in c["residual_bins"]:
        span = slice(at, at + b["num_elements"])
        peak = (np.abs(resid[:, span]) + coef_err[:, span]).max(1, keepdims=True)
        step = peak / (1.0 if b["element_bits"] == 1 else 2.0 ** (b["element_bits"] - 1)) * (1 + 2 * UNIT[b["scale_dtype"]])
        err[:, ek + at : ek + at + b["num_elements"]] = (2.0 if b["element_bits"] == 1 else 1.0) * step + coef_err[:, span]
        at += b["num_elements"]
    return np.cumsum(err, 1) * 1.000001 + 1e-12 if c.get("delta_encoding", True) else err + 1e-12


@pytest.mark.parametrize("base", [RECOMMENDED, QWEN_README, BUDGET, BINS, BINS_ONLY], ids=["recommended", "qwen-readme", "budget", "bins", "bins-only"])
def test_logprobs_within_the_formats_error_of_a_dense_reference(base):
    rng = np.random.default_rng(0)
    V = 4000
    ids, lp, _ = _reference(rng, 300, V, base["k"])
    cfg = _cfg(base, V)
    lp_bytes, id_bytes = encode_positions(cfg, ids, lp)
    assert lp_bytes.shape == (300, cfg.logprob_bytes) and id_bytes.shape == (300, cfg.index_bytes)
    got_ids, got = decode_ids(cfg, id_bytes), decode_logprobs(cfg, lp_bytes)
    np.testing.assert_array_equal(got_ids, ids)
    bound = _error_bound(base, lp)
    assert np.all(np.abs(got - lp) <= bound), float((np.abs(got - lp) - bound).max())
    # the exact part is exact to its dtype: the largest error there is below 2 units of |lp|
    ek = base["exact_k"]
    if ek:
        assert np.abs(got - lp)[:, :ek].max() <= 2 * UNIT[base["exact_dtype"]] * np.abs(lp[:, :ek]).max() + 1e-12


def test_tail_is_the_mass_outside_the_top_k():
    rng = np.random.default_rng(1)
    V = 2000
    ids, lp, outside = _reference(rng, 200, V, 32, scale=2.0)
    cfg = _cfg({**QWEN_README, "k": 32, "exact_k": 32}, V)  # exact float32: the tail is as good as float32 top-k
    lp_bytes, _ = encode_positions(cfg, ids, lp)
    got, _, tail = with_tail(decode_logprobs(cfg, lp_bytes), V)
    # 1 - sum p in float64 from float32-exact values: off by at most sum p * 2^-24 * |lp| absolute
    np.testing.assert_allclose(np.exp(tail), np.exp(outside), atol=32 * 2.0**-24 * np.abs(lp).max(), rtol=0)
    # k = V: every token is in the top-k, no tail
    full_ids, full_lp, _ = _reference(rng, 5, 16, 16)
    _, _, tail_full = with_tail(full_lp, 16)
    assert np.isneginf(tail_full).all()
    # lossy parts overshooting 1: the top-k hold all the mass, renormalised to 1, tail -inf
    over, p_over, tail_over = with_tail(np.log(np.array([[0.7, 0.35], [0.5, 0.25]])), 1000)
    np.testing.assert_allclose(np.exp(over).sum(1), [1.0, 0.75])
    np.testing.assert_allclose(p_over, np.exp(over))
    assert np.isneginf(tail_over[0]) and tail_over[1] == pytest.approx(np.log(0.25))
    # tiny tails are floored at 1e-10 as for vLLM caches
    _, _, tail_tiny = with_tail(np.log(np.array([[1 - 1e-13, 1e-14]])), 1000)
    assert tail_tiny[0] == pytest.approx(np.log(1e-10))


# --------------------------------------------------------------------------- whole imports
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from conftest import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(path)
    return path


def _settings_file(folder, base: dict, d: int) -> None:
    (folder / "compression_config.yaml").write_text(yaml.safe_dump({**base, "d": d}))


def test_import_opens_verifies_and_trains_a_student(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    V = len(AutoTokenizer.from_pretrained(str(tokenizer)))
    base = {**RECOMMENDED, "k": 8, "exact_k": 2, "polynomial_terms": [0, 1, "sqrt"]}
    rng = np.random.default_rng(2)
    src = tmp_path / "logits"
    src.mkdir()
    rows = _rows(rng, 40, V, 8, lengths=(8, 40))
    cfg = _cfg(base, V)
    write_distillkit(src / "data_0.parquet", rows[:25], cfg, row_group_rows=10)
    write_distillkit(src / "data_1.parquet", rows[25:], cfg, row_group_rows=10)
    _settings_file(src, base, V)
    r = CliRunner().invoke(main, ["import", str(src), "--out", str(tmp_path / "cache"), "--tokenizer", str(tokenizer),
                                  "--teacher", "tiny", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "compression settings from" in r.output and "40 rows" in r.output
    cache = open_cache(tmp_path / "cache")
    m = cache.manifest
    assert m.top_k == 8 and m.vocab_size == V and m.teacher["name"] == "tiny" and m.tokenizer["fingerprint"]
    assert m.settings["scoring"]["distillkit_compression"]["exact_dtype"] == "bfloat16"
    assert verify_cache(tmp_path / "cache", deep=True).ok
    exs = list(cache.stream())
    assert [e["example_id"] for e in exs] == [f"doc-{i}" for i in range(40)]
    for ex, row in zip(exs, rows):
        T = len(row["input_ids"])
        np.testing.assert_array_equal(ex["input_ids"], row["input_ids"])
        np.testing.assert_array_equal(ex["topk_ids"], row["topk_ids"])
        assert ex["topk_logprobs"].shape == (T - 1, 8) and ex["loss_mask"].shape == (T - 1,) and ex["num_loss_tokens"] == T - 1
        # the decoded values (within the format's error of the reference; where the fit overshoots a mass of 1,
        # shifted to sum to 1), stored as fp16
        decoded = decode_logprobs(cfg, encode_positions(cfg, row["topk_ids"], row["topk_logprobs"])[0])
        assert np.all(np.abs(decoded - row["topk_logprobs"]) <= _error_bound(base, row["topk_logprobs"]))
        lp, _, tail = with_tail(decoded, V)
        np.testing.assert_allclose(ex["topk_logprobs"], lp, rtol=2.0**-11, atol=0)
        np.testing.assert_allclose(ex["tail_logprob"], tail, rtol=1e-6, atol=0)
        # NLL: the next token's decoded log-prob, or the tail bucket's when it is outside the top-k, over targets t -> t + 1
        nxt = np.array(row["input_ids"][1:])
        hit = row["topk_ids"] == nxt[:, None]
        ref = np.where(hit.any(1), -(lp * hit).sum(1), -np.maximum(tail, np.log(1e-10))).mean()
        assert ex["teacher_nll"] == pytest.approx(ref, rel=1e-6)
        assert hit.any(1).mean() > 0.3  # the data exercises both branches
    from kdcache.train import StudentConfig, TrainConfig, train

    final = train(TrainConfig(cache=str(tmp_path / "cache"), out=str(tmp_path / "run"), loss="kd", steps=3, batch_size=4, eval_every=0, save_every=0,
                              student=StudentConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)), progress=False)
    assert np.isfinite(final["eval_ppl"])


def test_packed_rows_split_by_sequence_with_labels_as_the_loss_mask(tmp_path):
    """DistillKit's packing: P = T positions, attention_mask numbers the packed sequences; each sequence's last
    position predicts a token it cut away. Its examples equal those of the same sequences captured alone."""
    rng = np.random.default_rng(3)
    V, k = 500, 8
    cfg = _cfg({**QWEN_README, "k": k, "exact_k": k}, V)  # exact float32: compare values tightly
    alone = _rows(rng, 3, V, k, lengths=(4, 12))  # captured: P = T - 1
    packed = {"input_ids": [], "topk_ids": [], "topk_logprobs": [], "attention_mask": [], "labels": [], "id": "pack"}
    for s, row in enumerate(alone):
        packed["input_ids"] += row["input_ids"]
        extra_ids, extra_lp = _reference(rng, 1, V, k)[:2]  # the dropped last position: a prediction of nothing kept
        packed["topk_ids"].append(np.concatenate([row["topk_ids"], extra_ids]))
        packed["topk_logprobs"].append(np.concatenate([row["topk_logprobs"], extra_lp]))
        packed["attention_mask"] += [s + 1] * len(row["input_ids"])
        labels = list(row["input_ids"])
        labels[1] = -100  # token 1 is not a target: position 0 leaves the loss
        packed["labels"] += labels
    packed["input_ids"] += [0, 0]  # padding
    packed["attention_mask"] += [0, 0]
    packed["labels"] += [-100, -100]
    packed["topk_ids"] = np.concatenate(packed["topk_ids"] + [_reference(rng, 2, V, k)[0]])
    packed["topk_logprobs"] = np.concatenate(packed["topk_logprobs"] + [_reference(rng, 2, V, k)[1]])
    write_distillkit(tmp_path / "packed.parquet", [packed], cfg)
    write_distillkit(tmp_path / "alone.parquet", alone, cfg)
    settings = {**QWEN_README, "k": k, "exact_k": k, "d": V}
    import_distillkit(tmp_path / "packed.parquet", tmp_path / "p", settings, logprob_codec="fp32")
    import_distillkit(tmp_path / "alone.parquet", tmp_path / "a", settings, logprob_codec="fp32")
    got, want = _stream(tmp_path / "p"), _stream(tmp_path / "a")
    assert [e["example_id"] for e in got] == ["pack#s0", "pack#s1", "pack#s2"]
    for g, w, row in zip(got, want, alone):
        for name in ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob"):
            np.testing.assert_array_equal(g[name], w[name], err_msg=name)
        np.testing.assert_allclose(g["topk_logprobs"], row["topk_logprobs"], rtol=2e-7)
        assert not g["loss_mask"][0] and g["loss_mask"][1:].all() and w["loss_mask"].all()
        assert g["num_loss_tokens"] == len(row["input_ids"]) - 2
        # the packed NLL leaves position 0 out: the mean of the captured one's other positions
        nxt = np.array(row["input_ids"][1:])
        hit = row["topk_ids"] == nxt[:, None]
        per = np.where(hit.any(1), -(row["topk_logprobs"] * hit).sum(1), -np.log1p(-np.exp(row["topk_logprobs"]).sum(1)))
        assert g["teacher_nll"] == pytest.approx(per[1:].mean(), rel=1e-5)
        assert w["teacher_nll"] == pytest.approx(per.mean(), rel=1e-5)


def test_bad_rows_are_counted_or_refused_with_strict(tmp_path):
    rng = np.random.default_rng(4)
    V, k = 300, 4
    cfg = _cfg({**BUDGET, "k": k}, V)
    rows = _rows(rng, 6, V, k)
    rows[2] = {**rows[2], "topk_ids": rows[2]["topk_ids"][:-1], "topk_logprobs": rows[2]["topk_logprobs"][:-1]}  # P = T - 2
    rows[4] = {**rows[4], "input_ids": rows[4]["input_ids"][:1], "topk_ids": rows[4]["topk_ids"][:0], "topk_logprobs": rows[4]["topk_logprobs"][:0]}
    # two packed sequences (attention_mask 1, 2) but P = T - 1: the capture layout cannot hold several sequences
    T5 = len(rows[5]["input_ids"])
    rows[5] = {**rows[5], "attention_mask": [1] * 2 + [2] * (T5 - 2)}
    for r in rows:
        r.setdefault("attention_mask", [1] * len(r["input_ids"]))
    write_distillkit(tmp_path / "d.parquet", rows, cfg)
    # row 1: one position fewer in bytepacked_indices than in compressed_logprobs
    table = pq.read_table(tmp_path / "d.parquet")
    idx = table.column("bytepacked_indices").to_pylist()
    idx[1] = idx[1][:-1]
    table = table.set_column(table.schema.get_field_index("bytepacked_indices"), "bytepacked_indices",
                             pa.array(idx, pa.list_(pa.list_(pa.uint8()))))
    pq.write_table(table, tmp_path / "d.parquet")
    settings = {**BUDGET, "k": k, "d": V}
    m = import_distillkit(tmp_path / "d.parquet", tmp_path / "c", settings)
    assert m.num_rows == 2 and m.stats["bad_rows.positions_mismatch"] == 3 and m.stats["bad_rows.too_short"] == 1
    assert [e["example_id"] for e in _stream(tmp_path / "c")] == ["doc-0", "doc-3"]
    r = CliRunner().invoke(main, ["import", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "s"), "--strict", "--quiet",
                                  *[f"--set={k_}={json.dumps(v)}" for k_, v in settings.items()]])
    P1 = len(rows[1]["input_ids"]) - 1
    assert r.exit_code == 2 and f"bad row 1: {P1} compressed_logprobs positions but {P1 - 1} bytepacked_indices (reason positions_mismatch)" in r.output
    assert not (tmp_path / "s").exists()  # nothing left behind
    # every row bad: one line, no cache
    write_distillkit(tmp_path / "bad.parquet", [rows[2], rows[4]], cfg)
    with pytest.raises(DataError, match="no usable rows"):
        import_distillkit(tmp_path / "bad.parquet", tmp_path / "b", settings)
    assert not (tmp_path / "b").exists()


def _sets(settings: dict) -> list[str]:
    return [f"--set={k}={json.dumps(v)}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "d.parquet"
    write_distillkit(path, _rows(np.random.default_rng(5), 8, 600, 16), _cfg({**RECOMMENDED, "k": 16, "exact_k": 4}, 600))
    return path


GOOD = {**RECOMMENDED, "k": 16, "exact_k": 4, "d": 600}
MISTAKES = [  # (settings, words the one error line must hold)
    ({k: v for k, v in GOOD.items() if k != "exact_k"}, ["exact_k is missing", "--set exact_k="]),
    ({k: v for k, v in GOOD.items() if k != "d"}, ["d is missing", "--set d="]),
    ({k: v for k, v in GOOD.items() if k != "residual_bins"}, ["residual_bins is missing", "--set residual_bins=[]"]),
    ({**GOOD, "exactk": 3}, ["unknown DistillKit compression setting 'exactk'", "did you mean exact_k"]),
    ({**GOOD, "exact_k": 17}, ["exact_k=17", "between 0 and k (16)"]),
    ({**GOOD, "exact_dtype": "bf16"}, ["exact_dtype", "bfloat16"]),
    ({**GOOD, "polynomial_terms": [0, -1]}, ["polynomial_terms", "negative power"]),
    ({**GOOD, "residual_bins": [{"scale_dtype": "float16", "element_bits": 8, "num_elements": 13}]}, ["residual_bins", "sum to 13", "k - exact_k = 12"]),
    ({**GOOD, "residual_bins": [{"scale_dtype": "float16", "element_bits": 8}]}, ["residual_bins[0]", "num_elements is missing"]),
    ({**GOOD, "exact_dtype": "float32"}, ["compressed_logprobs holds 32 bytes per position", "give 40", "exact_dtype"]),
    ({**GOOD, "d": 2000}, ["bytepacked_indices holds 20 bytes per position", "11 bits (d=2000)", "check k and d"]),
]


def test_delta_encoded_data_read_without_delta_encoding_is_refused(tmp_path):
    base = {**QWEN_README, "k": 32, "d": 600}
    write_distillkit(tmp_path / "d.parquet", _rows(np.random.default_rng(7), 8, 600, 32), _cfg(base, 600))
    with pytest.raises(ConfigError, match="not distributions.*delta_encoding \\(now false\\)"):
        import_distillkit(tmp_path / "d.parquet", tmp_path / "c", {**base, "delta_encoding": False})
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("settings,words", MISTAKES, ids=[w[0].split()[0] + f"-{i}" for i, (_, w) in enumerate(MISTAKES)])
def test_missing_or_wrong_settings_are_one_line(small_file, tmp_path, settings, words):
    out = tmp_path / "cache"
    r = CliRunner().invoke(main, ["import", str(small_file), "--out", str(out), "--quiet", *_sets(settings)])
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in r.output and not out.exists()


def test_settings_found_next_to_the_data_or_in_a_distillkit_training_config(small_file, tmp_path):
    folder = tmp_path / "ds" / "data"
    folder.mkdir(parents=True)
    (folder / "train-00000-of-00001.parquet").write_bytes(small_file.read_bytes())
    (tmp_path / "ds" / "compression_config.yaml").write_text(yaml.safe_dump(GOOD))  # the dataset's root, one level up
    r = CliRunner().invoke(main, ["import", str(tmp_path / "ds" / "data"), "--out", str(tmp_path / "a"), "--quiet"])
    assert r.exit_code == 0 and f"compression settings from {tmp_path / 'ds' / 'compression_config.yaml'}" in r.output, r.output
    training = {"model": "Qwen/Qwen3-8B", "teacher": {"kind": "dataset", "logprob_compressor": GOOD}, "loss_functions": []}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(training))
    r = CliRunner().invoke(main, ["import", str(small_file), "--out", str(tmp_path / "b"), "--config", str(tmp_path / "train.yaml"), "--quiet"])
    assert r.exit_code == 0, r.output
    a, b = _stream(tmp_path / "a"), _stream(tmp_path / "b")
    assert len(a) == len(b) == 8 and all(np.array_equal(x["topk_logprobs"], y["topk_logprobs"]) for x, y in zip(a, b))
    # --set over the file: a wrong override is caught against the data
    r = CliRunner().invoke(main, ["import", str(small_file), "--out", str(tmp_path / "c"), "--config", str(tmp_path / "train.yaml"),
                                  "--set", "exact_k=5", "--quiet"])
    assert r.exit_code == 2 and "bytes per position" in r.output
    (tmp_path / "legacy.yaml").write_text(yaml.safe_dump({"teacher": {"kind": "dataset", "legacy_logit_compression": {"k": 128}}}))
    with pytest.raises(ConfigError, match="legacy"):
        from kdcache.cache.distillkit import load_config

        load_config(small_file, tmp_path / "legacy.yaml")


def test_rerun_does_no_work_and_an_interrupted_import_resumes(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    V, k = 700, 16
    base = {**QWEN_README, "k": k, "exact_k": 4, "d": V}
    write_distillkit(tmp_path / "d.parquet", _rows(rng, 60, V, k), _cfg(base, V), row_group_rows=7)
    kw = dict(shard_tokens=200, row_group_tokens=50)
    clean = import_distillkit(tmp_path / "d.parquet", tmp_path / "clean", base, **kw)
    assert clean.status == "complete" and len(clean.shards) > 3
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "clean").iterdir()}
    t0 = time.perf_counter()
    again = import_distillkit(tmp_path / "d.parquet", tmp_path / "clean", base, **kw)
    assert time.perf_counter() - t0 < 10.0 and again.shards == clean.shards
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "clean").iterdir()} == files  # nothing rewritten
    r = CliRunner().invoke(main, ["import", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "clean"), "--quiet", *_sets(base)])
    assert r.exit_code == 0 and "60 rows" in r.output and "(complete)" in r.output, r.output

    from kdcache.cache.writer import CacheWriter

    real, calls = CacheWriter.add_row, {"n": 0}

    def stop_after_35(self, examples, end):
        calls["n"] += 1
        if calls["n"] > 35:
            raise KeyboardInterrupt
        real(self, examples, end)

    monkeypatch.setattr(CacheWriter, "add_row", stop_after_35)
    with pytest.raises(KeyboardInterrupt):
        import_distillkit(tmp_path / "d.parquet", tmp_path / "cut", base, **kw)
    monkeypatch.setattr(CacheWriter, "add_row", real)
    partial = open_cache(tmp_path / "cut").manifest
    assert partial.status == "in_progress" and 0 < partial.num_rows <= 35
    resumed = import_distillkit(tmp_path / "d.parquet", tmp_path / "cut", base, **kw)
    assert resumed.status == "complete" and resumed.num_rows == 60
    a, b = _stream(tmp_path / "clean"), _stream(tmp_path / "cut")
    assert [e["example_id"] for e in a] == [e["example_id"] for e in b]
    for x, y in zip(a, b):
        for name in x:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    # other settings on the same cache: refused, kept
    with pytest.raises(CacheMismatchError, match="different settings"):
        import_distillkit(tmp_path / "d.parquet", tmp_path / "clean", {**base, "exact_k": 5}, **kw)


@pytest.mark.parametrize("V", [151_936, 262_144])
def test_vocabularies_over_2_to_the_17(V, tmp_path):
    """The ids' 18th bit survives into the cache's int32 ids (a 17-bit id format cannot hold them)."""
    rng = np.random.default_rng(V)
    k = 32
    rows = []
    for i in range(6):
        T = int(rng.integers(5, 20))
        ids, lp, _ = _reference(rng, T - 1, V, k, scale=3.0)  # dense over the whole vocabulary
        rows.append({"input_ids": rng.integers(0, V, size=T), "topk_ids": ids, "topk_logprobs": lp})
    base = {**RECOMMENDED, "k": k, "exact_k": 4, "d": V}
    write_distillkit(tmp_path / "big.parquet", rows, _cfg(base, V))
    m = import_distillkit(tmp_path / "big.parquet", tmp_path / "c", base)
    assert m.vocab_size == V and m.num_rows == 6
    for ex, row in zip(_stream(tmp_path / "c"), rows):
        np.testing.assert_array_equal(ex["topk_ids"], row["topk_ids"])  # the writer sorted by value: the same order
    assert max(int(ex["topk_ids"].max()) for ex in _stream(tmp_path / "c")) >= 2**17
    # a cache vocabulary larger than d (the model's padded vocab): ids stay, the manifest says the model's size
    m = import_distillkit(tmp_path / "big.parquet", tmp_path / "padded", base, vocab_size=V + 128)
    assert m.vocab_size == V + 128


def test_other_column_types_read_the_same(small_file, tmp_path):
    """Tools that rewrite DistillKit's files (Hugging Face datasets, pandas) may store the bytes as list<binary> or
    wider integers, input_ids as int32: the same cache."""
    table = pq.read_table(small_file)
    lp, ix = table.column("compressed_logprobs").to_pylist(), table.column("bytepacked_indices").to_pylist()
    variants = {
        "binary": pa.table({"input_ids": pa.array(table.column("input_ids").to_pylist(), pa.list_(pa.int32())),
                            "compressed_logprobs": pa.array([[bytes(p) for p in r] for r in lp], pa.list_(pa.binary())),
                            "bytepacked_indices": pa.array([[bytes(p) for p in r] for r in ix], pa.list_(pa.large_binary()))}),
        "int64": pa.table({"input_ids": table.column("input_ids"),
                           "compressed_logprobs": pa.array(lp, pa.large_list(pa.list_(pa.int64()))),
                           "bytepacked_indices": pa.array(ix, pa.list_(pa.list_(pa.int16())))}),
    }
    import_distillkit(small_file, tmp_path / "ref", GOOD)
    want = _stream(tmp_path / "ref")
    for name, t in variants.items():
        pq.write_table(t, tmp_path / f"{name}.parquet", row_group_size=3)
        import_distillkit(tmp_path / f"{name}.parquet", tmp_path / name, GOOD)
        got = _stream(tmp_path / name)
        assert len(got) == len(want) == 8
        for g, w in zip(got, want):
            for col in ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob", "loss_mask"):
                np.testing.assert_array_equal(g[col], w[col], err_msg=f"{name}: {col}")
