"""Cache format 2: the sqrt-delta top-k codec in real caches, v1 caches still read, `kdcache export`.

References are independent of the codec: the same teacher's cache in plain fp32 lists (format 1) and a float64
KL over the k+1 buckets; plain pyarrow reads of the committed v1 fixture; random byte flips on disk.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from kdcache.cache import CacheWriter, make_signals, open_cache, read_manifest, verify_cache
from kdcache.cache.export import export_cache
from kdcache.cli import main
from kdcache.errors import CacheFormatError, ConfigError
from test_generate import run
from test_verify import SETTINGS, one_line, read_everything, same

FIXTURE = Path(__file__).parent / "fixtures" / "cache-v1"


def _kl(lp_a, tail_a, ids_a, lp_b, tail_b, ids_b) -> np.ndarray:
    """KL(a || b) per position over the k+1 buckets, float64, buckets matched by id (b's ids are a's as a set)."""
    order_a, order_b = np.argsort(ids_a, 1), np.argsort(ids_b, 1)
    pa_ = np.exp(np.take_along_axis(lp_a.astype(np.float64), order_a, 1))
    pb = np.exp(np.take_along_axis(lp_b.astype(np.float64), order_b, 1))
    ta, tb = np.exp(tail_a.astype(np.float64)), np.exp(tail_b.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(pa_ > 0, pa_ * (np.log(pa_) - np.log(pb)), 0.0).sum(1)
        terms += np.where(ta > 0, ta * (np.log(ta) - np.log(tb)), 0.0)
    return terms


def test_the_v1_fixture_reads_as_plain_parquet_says(tmp_path):
    """Written by kdcache before format 2 existed (c6b0a8c; tiny teacher, top-4, 3 sampled draws, int8 hidden layer 1)."""
    m = read_manifest(FIXTURE)
    assert m.format_version == 1 and "storage" not in m.signals["topk"]
    assert verify_cache(FIXTURE, deep=True).ok
    table = pq.read_table(FIXTURE / "part-00000.parquet")
    got = list(open_cache(FIXTURE))
    assert len(got) == table.num_rows == m.num_rows
    k = m.top_k
    for i, ex in enumerate(got):
        row = {name: table.column(name)[i].as_py() for name in table.column_names}
        np.testing.assert_array_equal(ex["input_ids"], row["input_ids"])
        np.testing.assert_array_equal(ex["topk_ids"], np.array(row["topk_ids"]).reshape(-1, k))
        np.testing.assert_array_equal(ex["topk_logprobs"], np.array(row["topk_logprobs"], dtype=np.float16).astype(np.float32).reshape(-1, k))
        q = np.frombuffer(row["hidden_1"], dtype=np.int8).reshape(len(row["input_ids"]), -1).astype(np.float32)
        np.testing.assert_allclose(ex["hidden_1"], q * np.array(row["hidden_1_scale"], dtype=np.float32)[:, None], rtol=1e-6)
        assert ex["example_id"] == row["example_id"] and ex["teacher_nll"] == pytest.approx(row["teacher_nll"])
    # a student trains on it
    from kdcache.train import TrainConfig, train

    cfg = TrainConfig(cache=str(FIXTURE), out=str(tmp_path / "run"), steps=2, batch_size=2, eval_fraction=0.5, eval_every=0, save_every=0)
    for key, v in {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 32}.items():
        setattr(cfg.student, key, v)
    assert np.isfinite(train(cfg, progress=False)["eval_ppl"])


@pytest.fixture(scope="module")
def pair(tiny_teacher, text_jsonl, tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    plain = run(tiny_teacher, root / "lists", text_jsonl, top_k=16, logprob_codec="fp32", data={"max_rows": 24})
    coded = run(tiny_teacher, root / "coded", text_jsonl, top_k=16, codec="sqrt-delta", data={"max_rows": 24})
    return root, plain, coded


def test_sqrt_delta_cache_holds_the_same_id_sets_within_its_kl_target(pair):
    root, plain, coded = pair
    m = read_manifest(root / "coded")
    assert m.format_version == 2 and m.signals["topk"]["storage"]["name"] == "sqrt-delta"
    assert m.settings["scoring"]["codec"] == "sqrt-delta" and "codec" not in read_manifest(root / "lists").settings["scoring"]
    kls = []
    for a, b in zip(plain, coded):
        assert a["example_id"] == b["example_id"]
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(np.sort(a["topk_ids"], 1), np.sort(b["topk_ids"], 1))
        assert (np.diff(b["topk_logprobs"], axis=1) <= 0).all()  # rank order: most likely first
        total = np.exp(b["topk_logprobs"].astype(np.float64)).sum(1) + np.exp(b["tail_logprob"].astype(np.float64))
        np.testing.assert_allclose(total, 1.0, atol=1e-5)
        kls.append(_kl(a["topk_logprobs"], a["tail_logprob"], a["topk_ids"], b["topk_logprobs"], b["tail_logprob"], b["topk_ids"]))
        assert b["teacher_nll"] == pytest.approx(a["teacher_nll"], abs=1e-5)  # statistics are exact, not decoded
    kls = np.concatenate(kls)
    assert kls.mean() < 2e-4 and kls.max() < 2e-3, (kls.mean(), kls.max())
    assert verify_cache(root / "coded", deep=True).ok
    assert m.num_bytes < read_manifest(root / "lists").num_bytes


def test_scalar_columns_stay_plain_parquet_and_export_gives_plain_lists(pair, tmp_path):
    import pandas as pd

    root, _, coded = pair
    df = pd.read_parquet(root / "coded", columns=["example_id", "teacher_nll", "num_loss_tokens"])
    assert list(df["example_id"]) == [ex["example_id"] for ex in coded]
    r = CliRunner().invoke(main, ["export", str(root / "coded"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    table = pq.read_table(tmp_path / "x")
    widths = json.loads((tmp_path / "x" / "_export.json").read_text())["widths"]
    for i, ex in enumerate(coded):
        np.testing.assert_array_equal(np.array(table.column("topk_ids")[i].as_py()).reshape(-1, widths["topk_ids"]), ex["topk_ids"])
        np.testing.assert_array_equal(np.array(table.column("topk_logprobs")[i].as_py(), dtype=np.float32).reshape(-1, 16), ex["topk_logprobs"])
    r = CliRunner().invoke(main, ["export", str(root / "coded"), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "not empty" in r.output


def test_a_student_trains_on_a_coded_cache(pair, tmp_path):
    from kdcache.train import TrainConfig, train

    root, _, _ = pair
    cfg = TrainConfig(cache=str(root / "coded"), out=str(tmp_path / "run"), steps=3, batch_size=4, eval_fraction=0.2, eval_every=0,
                      save_every=0, loss="kd", alpha=0.5)
    for key, v in {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 32}.items():
        setattr(cfg.student, key, v)
    final = train(cfg, progress=False)
    assert np.isfinite(final["eval_ppl"]) and np.isfinite(final["eval_kd"])


def _topk_rows(rng, T: int, k: int, vocab: int):
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(T - 1)]) if vocab < 10**6 else \
        np.sort(rng.integers(0, vocab, size=(T - 1, 4 * k)), 1)[:, ::4][:, :k]
    logits = rng.normal(0, 3, size=(T - 1, k + 1))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    order = np.argsort(-lp[:, :k], 1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(lp[:, :k], order, 1).astype(np.float32), lp[:, k].astype(np.float32)


@pytest.mark.parametrize("vocab", [262_144, 2**31 - 1])
def test_any_vocabulary_size(tmp_path, vocab):
    rng = np.random.default_rng(vocab % 1000)
    signals = make_signals(top_k=8, vocab_size=vocab, topk_codec="sqrt-delta")
    w = CacheWriter(tmp_path / "c", {**SETTINGS, "tokenizer": {"vocab_size": vocab}}, signals)
    rows = []
    for i in range(6):
        T = int(rng.integers(2, 12))
        ids, lp, tail = _topk_rows(rng, T, 8, vocab)
        if i == 0:
            ids[0] = np.arange(vocab - 8, vocab)  # the largest ids
        ex = {"example_id": str(i), "input_ids": rng.integers(0, min(vocab, 2**31 - 1), size=T), "loss_mask": np.ones(T - 1, bool),
              "topk_ids": ids, "topk_logprobs": lp, "tail_logprob": tail, "teacher_nll": 1.0, "teacher_entropy": 1.0, "num_loss_tokens": T - 1}
        rows.append(ex)
        w.add_row([ex], i + 1)
    w.close()
    for ex, got in zip(rows, open_cache(tmp_path / "c")):
        np.testing.assert_array_equal(np.sort(got["topk_ids"], 1), np.sort(ex["topk_ids"], 1))
    assert verify_cache(tmp_path / "c", deep=True).ok


def test_bad_codec_settings_are_one_line(tiny_teacher, text_jsonl, tmp_path):
    for args, words in [(["--codec", "zip"], ["unknown top-k codec", "sqrt-delta"]),
                        (["--codec", "sqrt-delta", "--set", "codec_options={kll: 1}"], ["unknown codec_options", "kl"]),
                        (["--set", "codec_options={kl: 1}"], ["lists top-k codec takes no codec_options"])]:
        r = CliRunner().invoke(main, ["generate", "--teacher", str(tiny_teacher), "--dataset", str(text_jsonl), "--out", str(tmp_path / "c"),
                                      "--device", "cpu", "--quiet", *args])
        lines = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert r.exit_code != 0 and len(lines) == 1 and all(w in lines[0] for w in words), r.output
        assert not (tmp_path / "c").exists()


def test_flips_in_a_coded_cache_are_never_silent(tmp_path):
    rng = np.random.default_rng(7)
    signals = make_signals(top_k=4, vocab_size=5000, topk_codec="sqrt-delta")
    w = CacheWriter(tmp_path / "good", SETTINGS, signals, shard_tokens=120, row_group_tokens=40)
    for i in range(30):
        T = int(rng.integers(2, 20))
        ids, lp, tail = _topk_rows(rng, T, 4, 5000)
        w.add_row([{"example_id": str(i), "input_ids": rng.integers(0, 5000, size=T), "loss_mask": np.ones(T - 1, bool), "topk_ids": ids,
                    "topk_logprobs": lp, "tail_logprob": tail, "teacher_nll": 1.0, "teacher_entropy": 1.0, "num_loss_tokens": T - 1}], i + 1)
    w.close()
    good, work = tmp_path / "good", tmp_path / "work"
    shutil.copytree(good, work)
    shards = read_manifest(good).shards
    original = read_everything(good)
    r = random.Random(3)
    errors = 0
    for _ in range(60):
        s = r.choice(shards)
        data = bytearray((good / s.name).read_bytes())
        pos = r.randrange(len(data))
        data[pos] ^= r.randrange(1, 256)
        (work / s.name).write_bytes(bytes(data))
        assert not verify_cache(work).ok
        with pytest.raises(CacheFormatError):
            read_everything(work)
        try:
            got = read_everything(work, verify_sha256=False)
        except CacheFormatError as exc:
            one_line(str(exc), s.name)
            errors += 1
        else:
            assert same(got, original), f"flip at {pos} of {s.name} changed decoded values silently"
        (work / s.name).write_bytes((good / s.name).read_bytes())
    assert errors > 30


def test_the_trainers_order_free_read_is_the_same_set_and_the_same_loss(pair):
    import torch

    from kdcache.train.data import EVAL_SIGNALS, collate, train_columns
    from kdcache.train.losses import LossSettings, sparse_kd_loss

    root, _, _ = pair
    ranked, free = open_cache(root / "coded"), open_cache(root / "coded", topk_order="any")
    cols = train_columns(ranked, EVAL_SIGNALS)
    a, b = list(ranked.stream(columns=cols)), list(free.stream(columns=cols))
    assert any(not np.array_equal(x["topk_ids"], y["topk_ids"]) for x, y in zip(a, b))  # another order is read...
    for x, y in zip(a, b):  # ...of the same ids with the same values
        np.testing.assert_array_equal(np.sort(x["topk_ids"], 1), np.sort(y["topk_ids"], 1))
        np.testing.assert_array_equal(np.sort(x["topk_logprobs"], 1), np.sort(y["topk_logprobs"], 1))
    ba, bb = collate(a), collate(b)
    logits = torch.randn(ba.targets.labels.shape[0], 128, generator=torch.Generator().manual_seed(0))
    logits = logits[:, : int(max(ba.targets.topk_ids.max(), ba.targets.labels.max())) + 1]
    s = LossSettings(temperature=2.0, alpha=0.5)
    la, lb = sparse_kd_loss(logits, ba.targets, s)[0], sparse_kd_loss(logits, bb.targets, s)[0]
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
