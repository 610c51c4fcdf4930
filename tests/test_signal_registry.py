"""Adding a signal takes one module and one registration: ``teacher_margin`` (each position's top1 - top2 teacher
log-prob gap, float32 [T-1]) is defined and registered in this file only, then written by the real writer, read back
by the real reader (alone and with the rest), and checked by ``verify --deep`` with its own invariant (gap >= 0).
A manifest naming a signal this kdcache does not know is refused in one line, by the reader, verify and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kdcache.cache import CacheWriter, make_signals, open_cache, verify_cache
from kdcache.cache.signals import Signal, build_signals, column, get, register, unregister
from kdcache.cli import main
from kdcache.errors import CacheFormatError

VOCAB = 3000
K = 4
SETTINGS = {"teacher": {"name": "t"}, "tokenizer": {"vocab_size": VOCAB}, "dataset": {"name": "margin"}}


class TeacherMargin(Signal):
    name = "teacher_margin"

    def entry(self, s):
        return {"definition": "topk_logprobs[:, 0] - topk_logprobs[:, 1], nats", "columns": {"teacher_margin": column(["T-1"], "float32")}}

    def check_rows(self, entry, rows):
        if "teacher_margin" in rows.values:
            bad = rows.values["teacher_margin"] < 0
            row_of = np.repeat(np.arange(rows.n), rows.lengths["teacher_margin"])
            rows.bad_row(np.isin(np.arange(rows.n), row_of[bad]), "teacher_margin < 0 (top1 below top2)")


@pytest.fixture
def margin_signal():
    register(TeacherMargin())
    yield
    unregister("teacher_margin")


def example(i: int, negative: bool = False, short: bool = False) -> dict:
    rng = np.random.default_rng(i)
    T = int(rng.integers(3, 25))
    lp = -np.sort(rng.uniform(0, 15, size=(T - 1, K)), axis=1).astype(np.float32)
    margin = (lp[:, 0] - lp[:, 1]).astype(np.float32)
    if negative:
        margin[-1] = -0.5
    mask = rng.random(T - 1) < 0.8
    return {
        "example_id": str(i), "input_ids": rng.integers(0, VOCAB, size=T), "loss_mask": mask,
        "topk_ids": np.stack([rng.choice(VOCAB, size=K, replace=False) for _ in range(T - 1)]), "topk_logprobs": lp,
        "tail_logprob": np.log(rng.uniform(1e-6, 1e-2, size=T - 1)).astype(np.float32),
        "teacher_nll": 1.0, "teacher_entropy": 2.0, "num_loss_tokens": int(mask.sum()),
        "teacher_margin": margin[:-1] if short else margin,
    }


def write(path: Path, codec: str, examples) -> Path:
    signals = {**make_signals(K, VOCAB, "fp32", topk_codec=codec), **build_signals({"teacher_margin": {}})}
    w = CacheWriter(path, SETTINGS, signals, shard_tokens=150, row_group_tokens=50)
    for i, ex in enumerate(examples):
        w.add_row([ex], i + 1)
    w.close()
    return path


def test_nothing_in_kdcache_knows_the_signal():
    root = Path(__file__).resolve().parents[1] / "kdcache"
    assert not [p for p in root.rglob("*.py") if "teacher_margin" in p.read_text()]


@pytest.mark.parametrize("codec", ["lists", "sqrt-delta"])
def test_new_signal_written_read_and_verified(tmp_path, margin_signal, codec):
    examples = [example(i) for i in range(40)]
    path = write(tmp_path / "c", codec, examples)
    manifest = json.loads((path / "_manifest.json").read_text())
    assert manifest["signals"]["teacher_margin"]["columns"]["teacher_margin"] == {"shape": ["T-1"], "dtype": "float32", "codec": "plain"}
    cache = open_cache(path)
    assert cache._file(0).schema_arrow.names[-1] == "teacher_margin"  # a new signal's columns go last
    assert "teacher_margin" in cache.columns and len(cache.manifest.shards) >= 2
    by_id = {ex["example_id"]: ex for ex in examples}
    got = list(cache.stream())
    assert len(got) == 40
    for ex in got:
        want = by_id[ex["example_id"]]
        assert ex["teacher_margin"].dtype == np.float32 and ex["teacher_margin"].shape == (len(want["input_ids"]) - 1,)
        np.testing.assert_array_equal(ex["teacher_margin"], want["teacher_margin"])
        assert np.array_equal(ex["topk_logprobs"].shape, want["topk_logprobs"].shape)
    alone = list(cache.stream(columns=["teacher_margin"]))
    assert set(alone[0]) == {"teacher_margin"}
    np.testing.assert_array_equal(np.concatenate([e["teacher_margin"] for e in alone]),
                                  np.concatenate([e["teacher_margin"] for e in got]))
    report = verify_cache(path, deep=True)
    assert report.ok, report.lines()
    assert report.shards and all(s.row_groups_decoded for s in report.shards)
    result = CliRunner().invoke(main, ["verify", str(path), "--deep"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("damage, says", [(dict(negative=True), "teacher_margin < 0"), (dict(short=True), "teacher_margin holds")])
def test_verify_runs_the_new_signals_checks(tmp_path, margin_signal, damage, says):
    examples = [example(i, **(damage if i == 17 else {})) for i in range(30)]
    path = write(tmp_path / "c", "lists", examples)
    report = verify_cache(path, deep=True)
    assert not report.ok
    problems = [p for s in report.bad_shards for p in s.problems]
    assert len(problems) == 1 and says in problems[0] and "example '17'" in problems[0], problems


def test_unknown_signal_in_a_manifest_is_one_line(tmp_path, margin_signal):
    path = write(tmp_path / "c", "lists", [example(i) for i in range(5)])
    unregister("teacher_margin")  # a kdcache that does not define it opens the cache
    for call in (lambda: open_cache(path), lambda: verify_cache(path, deep=True)):
        with pytest.raises(CacheFormatError) as err:
            call()
        text = str(err.value)
        assert "\n" not in text and "unknown signal 'teacher_margin'" in text and str(path) in text and "topk" in text
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code != 0 and "unknown signal 'teacher_margin'" in result.output
    assert "Traceback" not in result.output
    register(TeacherMargin())  # (the fixture unregisters it)


def test_registry_refuses_duplicates_and_lists_names(margin_signal):
    with pytest.raises(ValueError, match="already registered"):
        register(TeacherMargin())
    with pytest.raises(CacheFormatError, match="known: .*teacher_margin"):
        get("no_such_signal")


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_companions_come_from_the_signal(tmp_path, codec):
    """A hidden column asked for alone brings ``hidden_positions`` (the hidden signal's companion) and, with int8, is
    dequantised with its scale column: the reader learns both from the registry, not from column names."""
    signals = make_signals(2, VOCAB, "fp32", hidden_layers=[1], hidden_size=4, hidden_codec=codec, hidden_positions="stride:2")
    w = CacheWriter(tmp_path / "c", SETTINGS, signals, row_group_tokens=40)
    rng = np.random.default_rng(0)
    written = []
    for i in range(6):
        T = int(rng.integers(2, 12))
        P = len(range(0, T, 2))
        h = rng.normal(size=(P, 4)).astype(np.float32)
        written.append(h)
        mask = np.ones(T - 1, bool)
        w.add_row([{"example_id": str(i), "input_ids": rng.integers(0, VOCAB, T), "loss_mask": mask,
                    "topk_ids": np.tile([1, 2], (T - 1, 1)), "topk_logprobs": np.tile(np.float32([-0.1, -3.0]), (T - 1, 1)),
                    "tail_logprob": np.full(T - 1, -5, np.float32), "teacher_nll": 0.0, "teacher_entropy": 0.0,
                    "num_loss_tokens": T - 1, "hidden_1": h, "hidden_positions": np.arange(0, T, 2, dtype=np.int32)}], i + 1)
    w.close()
    got = list(open_cache(tmp_path / "c").stream(columns=["hidden_1"]))
    assert [set(e) for e in got] == [{"hidden_1", "hidden_positions"}] * 6
    for e, h in zip(got, written):
        assert e["hidden_1"].shape == h.shape and np.array_equal(e["hidden_positions"], np.arange(0, 2 * len(h), 2))
        np.testing.assert_allclose(e["hidden_1"], h, atol=np.abs(h).max() / 100)
