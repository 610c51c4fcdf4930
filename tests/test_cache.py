"""Tests of the on-disk cache contract: kdcache.cache (manifest, schema, codecs, writer, reader).

Everything here is real: real Parquet files in temporary directories, real crashes (a subprocess that
dies with ``os._exit``), a real full disk (``RLIMIT_FSIZE`` in a subprocess, so writes fail with EFBIG).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.cache import (
    CacheWriter,
    holdout_fraction_filter,
    make_signals,
    open_cache,
    read_manifest,
)
from kdcache.cache.manifest import MANIFEST_NAME, TOKENIZER_DIR
from kdcache.errors import CacheFormatError, CacheMismatchError, KDCacheError, OutOfSpaceError

# --------------------------------------------------------------------------------------------------
# Example generation. Kept as source text so the subprocess tests build byte-identical data.
GEN_SRC = textwrap.dedent(
    '''
    import numpy as np

    def make_example(rng, example_id, T, k, vocab, hidden_layers=(), hidden_size=0, generation=None,
                     special=True):
        """One cache row with random content; ``generation`` is (prompt_length, sample_index) or None."""
        mask = rng.random(T - 1) < 0.6
        lp = -rng.uniform(0.0, 30.0, size=(T - 1, k)).astype(np.float32)
        lp.sort(axis=1)
        lp = lp[:, ::-1].copy()  # most likely first
        tail = np.log(rng.uniform(1e-9, 1.0, size=T - 1)).astype(np.float32)
        if special and T - 1 >= 1 and rng.random() < 0.3:
            tail[0] = -np.inf  # top-k covered everything
            lp[0, -1] = -np.inf
        ex = {
            "example_id": example_id,
            "input_ids": rng.integers(0, vocab, size=T),
            "loss_mask": mask,
            "topk_ids": rng.integers(0, vocab, size=(T - 1, k)),
            "topk_logprobs": lp,
            "tail_logprob": tail,
            "teacher_nll": float(rng.uniform(0, 10)),
            "teacher_entropy": np.float32(rng.uniform(0, 10)),
            "num_loss_tokens": int(mask.sum()),
        }
        for layer in hidden_layers:
            ex[f"hidden_{layer}"] = rng.normal(0, 50, size=(T, hidden_size)).astype(np.float32)
        if generation is not None:
            ex["prompt_length"], ex["sample_index"] = generation
        return ex

    def row_examples(i, k=4, vocab=5000):
        """Input row i of a synthetic dataset: every 7th row is bad (no examples), every 5th has 2 samples."""
        if i % 7 == 3:
            return []
        rng = np.random.default_rng(1000 + i)
        n = 2 if i % 5 == 0 else 1
        return [make_example(rng, f"{i}#g{j}" if n > 1 else str(i), int(rng.integers(2, 30)), k, vocab)
                for j in range(n)]

    def expected_ids(start, stop):
        return [ex["example_id"] for i in range(start, stop) for ex in row_examples(i)]
    '''
)
exec(GEN_SRC)  # defines make_example, row_examples, expected_ids

SETTINGS = {"teacher": {"name": "tiny-teacher", "revision": "abc"}, "tokenizer": {"vocab_size": 5000}, "dataset": {"name": "d"}}
SIGNALS = make_signals(top_k=4, vocab_size=5000, logprob_codec="fp32")


def settings_for(vocab: int, name: str = "t") -> dict:
    return {"teacher": {"name": name}, "tokenizer": {"vocab_size": vocab}, "dataset": {"name": "synthetic"}}


def write_rows(path, start, stop, **kw) -> CacheWriter:
    """Write input rows [start, stop) with the default synthetic data; returns the (unclosed) writer."""
    kw.setdefault("shard_tokens", 120)
    kw.setdefault("row_group_tokens", 40)
    w = CacheWriter(path, SETTINGS, SIGNALS, **kw)
    for i in range(start, stop):
        w.add_row(row_examples(i), i + 1)
    return w


def ids_of(cache_path) -> list[str]:
    return [ex["example_id"] for ex in open_cache(cache_path).stream()]


def listing(path) -> set[str]:
    """The cache's files, without the writer's lock (held while a writer is open, see test_cache_safety.py)."""
    return set(os.listdir(path)) - {".kdcache.lock"}


def assert_only_committed(path) -> None:
    """The directory holds the manifest and exactly the shards it lists, each intact."""
    m = read_manifest(path)
    assert listing(path) == {MANIFEST_NAME} | {s.name for s in m.shards}, listing(path)
    for s in m.shards:
        data = (Path(path) / s.name).read_bytes()
        assert len(data) == s.bytes
        assert hashlib.sha256(data).hexdigest() == s.sha256


# --------------------------------------------------------------------------------------------------
# 1. Round trip


@st.composite
def cache_specs(draw):
    k = draw(st.integers(1, 8))
    vocab = draw(st.one_of(st.integers(k, 70_000), st.just(2**31 - 1)))
    lengths = draw(st.lists(st.integers(2, 40), min_size=1, max_size=25))
    hidden_layers = draw(st.one_of(st.just([]), st.lists(st.integers(-1, 40), min_size=1, max_size=3, unique=True)))
    return {
        "k": k,
        "vocab": vocab,
        "lengths": lengths,
        "logprob_codec": draw(st.sampled_from(["fp16", "fp32"])),
        "hidden_layers": hidden_layers,
        "hidden_size": draw(st.integers(1, 8)),
        "hidden_codec": draw(st.sampled_from(["fp16", "fp32"])),
        "generation": draw(st.booleans()),
        "row_group_tokens": draw(st.integers(1, 60)),
        "shard_tokens": draw(st.integers(1, 150)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def check_codec(got: np.ndarray, want: np.ndarray, codec: str) -> None:
    assert got.dtype == np.float32
    if codec == "fp32":
        np.testing.assert_array_equal(got, want.astype(np.float32))
    else:
        # Exactly IEEE round-to-nearest half, and so within half precision of the original.
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=2.0**-11, atol=2.0**-24)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=cache_specs())
def test_round_trip_property(spec):
    rng = np.random.default_rng(spec["seed"])
    k, H, layers = spec["k"], spec["hidden_size"], spec["hidden_layers"]
    signals = make_signals(
        top_k=k,
        vocab_size=spec["vocab"],
        logprob_codec=spec["logprob_codec"],
        hidden_layers=layers or None,
        hidden_size=H if layers else None,
        hidden_codec=spec["hidden_codec"],
        generation=spec["generation"],
    )
    examples = []
    for i, T in enumerate(spec["lengths"]):
        gen = (int(rng.integers(1, T + 1)), i % 3) if spec["generation"] else None
        eid = f"{i // 3}#g{i % 3}" if spec["generation"] else str(i)
        examples.append(make_example(rng, eid, T, k, spec["vocab"], layers, H, gen))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        with CacheWriter(
            path,
            settings_for(spec["vocab"]),
            signals,
            shard_tokens=spec["shard_tokens"],
            row_group_tokens=spec["row_group_tokens"],
        ) as w:
            for i, ex in enumerate(examples):
                w.add_row([ex], i + 1)

        # Manifest: complete, every row and token accounted for, shards cut where the settings say.
        m = read_manifest(path)
        assert m.status == "complete"
        assert m.num_rows == len(examples)
        assert m.num_tokens == sum(spec["lengths"])
        assert m.top_k == k and m.vocab_size == spec["vocab"]
        assert m.shards[-1].input_rows_end == len(examples)
        assert_only_committed(path)
        lengths = iter(spec["lengths"])
        group_tokens_all = []
        for si, shard in enumerate(m.shards):
            assert shard.rows == sum(shard.row_groups) and all(n >= 1 for n in shard.row_groups)
            meta = pq.ParquetFile(path / shard.name).metadata
            assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == shard.row_groups
            group_tokens = [[next(lengths) for _ in range(n)] for n in shard.row_groups]
            assert shard.tokens == sum(map(sum, group_tokens))
            if si < len(m.shards) - 1:  # every shard but the last is full, and cut as soon as it was
                assert shard.tokens >= spec["shard_tokens"]
                assert shard.tokens - sum(group_tokens[-1]) < spec["shard_tokens"]
            group_tokens_all += group_tokens
        for g in group_tokens_all[:-1]:  # every row group but the very last is full, and cut as soon as it was
            assert min(spec["row_group_tokens"], spec["shard_tokens"]) <= sum(g) < min(spec["row_group_tokens"], spec["shard_tokens"]) + g[-1]

        # Content, in write order.
        cache = open_cache(path)
        assert len(cache) == len(examples)
        got = list(cache.stream())
        assert len(got) == len(examples)
        for ex, g in zip(examples, got):
            T = len(ex["input_ids"])
            assert g["example_id"] == ex["example_id"]
            assert g["input_ids"].shape == (T,)
            np.testing.assert_array_equal(g["input_ids"], ex["input_ids"])
            assert g["loss_mask"].dtype == np.bool_
            np.testing.assert_array_equal(g["loss_mask"], ex["loss_mask"])
            assert g["topk_ids"].shape == (T - 1, k)
            np.testing.assert_array_equal(g["topk_ids"], ex["topk_ids"])
            assert g["topk_logprobs"].shape == (T - 1, k)
            check_codec(g["topk_logprobs"], ex["topk_logprobs"], spec["logprob_codec"])
            assert g["tail_logprob"].shape == (T - 1,)
            check_codec(g["tail_logprob"], ex["tail_logprob"], "fp32")
            assert g["teacher_nll"] == float(np.float32(ex["teacher_nll"]))
            assert g["teacher_entropy"] == float(np.float32(ex["teacher_entropy"]))
            assert g["num_loss_tokens"] == ex["loss_mask"].sum()
            for layer in layers:
                h = g[f"hidden_{layer}"]
                assert h.shape == (T, H)
                check_codec(h, ex[f"hidden_{layer}"], spec["hidden_codec"])
            if spec["generation"]:
                assert (g["prompt_length"], g["sample_index"]) == (ex["prompt_length"], ex["sample_index"])
            else:
                assert "prompt_length" not in g and "sample_index" not in g
            assert {c for c in g if c.startswith("hidden_")} == {f"hidden_{layer}" for layer in layers}


def test_small_settings_give_several_shards_and_row_groups(tmp_path):
    path = tmp_path / "c"
    write_rows(path, 0, 60).close()
    m = read_manifest(path)
    assert len(m.shards) >= 3
    assert any(len(s.row_groups) >= 2 for s in m.shards)
    assert ids_of(path) == expected_ids(0, 60)
    # Column projection reads only what was asked for.
    ex = next(iter(open_cache(path).stream(columns=["example_id", "topk_ids"])))
    assert set(ex) == {"example_id", "topk_ids"} and ex["topk_ids"].shape[1] == 4


def test_unknown_column_and_codec_are_refused(tmp_path):
    path = tmp_path / "c"
    write_rows(path, 0, 10).close()
    with pytest.raises(CacheFormatError, match="no column hidden_3"):
        open_cache(path).stream(columns=["input_ids", "hidden_3"])
    from kdcache.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown codec 'int4'.*fp16"):
        make_signals(top_k=4, vocab_size=10, logprob_codec="int4")


# --------------------------------------------------------------------------------------------------
# 2. Shuffle, resumable streams, filters

N_SHUFFLE_ROWS = 70


@pytest.fixture(scope="module")
def shuffle_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("shuffle") / "c"
    write_rows(path, 0, N_SHUFFLE_ROWS, shard_tokens=150, row_group_tokens=30).close()
    cache = open_cache(path)
    assert len(cache.row_groups) >= 12  # several windows of 3 row groups
    return path


def test_shuffle_is_deterministic_per_seed_and_a_permutation_per_epoch(shuffle_cache):
    cache = open_cache(shuffle_cache)
    all_ids = expected_ids(0, N_SHUFFLE_ROWS)
    n = len(all_ids)

    def run(seed, epochs=3):
        return [ex["example_id"] for ex in cache.stream(shuffle=True, seed=seed, window=3, epochs=epochs)]

    a, a2, b = run(1), run(1), run(2)
    assert a == a2
    assert a != b
    assert len(a) == 3 * n
    for e in range(3):
        epoch = a[e * n : (e + 1) * n]
        assert sorted(epoch) == sorted(all_ids)  # each example exactly once per epoch
        assert epoch != all_ids  # actually shuffled
    assert a[:n] != a[n : 2 * n]  # epochs differ
    # A fresh Cache object gives the same order (nothing depends on process state).
    assert [ex["example_id"] for ex in open_cache(shuffle_cache).stream(shuffle=True, seed=1, window=3, epochs=3)] == a
    # Unshuffled streams are in write order, every epoch.
    assert [ex["example_id"] for ex in cache.stream(epochs=2)] == all_ids * 2


def test_infinite_epochs(shuffle_cache):
    stream = open_cache(shuffle_cache).stream(shuffle=True, seed=3, window=2, epochs=None)
    n = len(expected_ids(0, N_SHUFFLE_ROWS))
    it = iter(stream)
    got = [next(it)["example_id"] for _ in range(4 * n + 5)]
    for e in range(4):
        assert sorted(got[e * n : (e + 1) * n]) == sorted(expected_ids(0, N_SHUFFLE_ROWS))


def _boundaries(cache, seed, window, epochs, keep=None):
    """Positions p (examples consumed) right at window and epoch boundaries."""
    stream = cache.stream(shuffle=True, seed=seed, window=window, epochs=epochs, keep=keep)
    out, prev = [], (0, 0)
    for p, _ in enumerate(stream, start=1):
        st_ = stream.state_dict()
        cur = (st_["epoch"], st_["window"])
        if cur != prev:
            out += [p - 1, p]
            prev = cur
        if st_["offset"] == 0:
            out.append(p)
    return out


@pytest.mark.parametrize("use_keep", [False, True])
def test_state_dict_resumes_exactly(shuffle_cache, use_keep):
    cache = open_cache(shuffle_cache)
    keep = (lambda eid: int(eid.split("#")[0]) % 3 != 0) if use_keep else None
    kw = dict(shuffle=True, seed=7, window=3, epochs=2, keep=keep)
    ref = [ex["example_id"] for ex in cache.stream(**kw)]
    if use_keep:
        assert sorted(ref) == sorted([i for i in expected_ids(0, N_SHUFFLE_ROWS) if keep(i)] * 2)
    rng = np.random.default_rng(0)
    positions = set(_boundaries(cache, 7, 3, 2, keep)) | {0, 1, len(ref) // 2, len(ref) - 1, len(ref)}
    positions |= set(rng.integers(0, len(ref) + 1, size=12).tolist())
    for p in sorted(positions):
        first = cache.stream(**kw)
        it = iter(first)
        consumed = [next(it)["example_id"] for _ in range(p)]
        assert consumed == ref[:p]
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        # Restored in a fresh process-like setting: a new Cache object, a new stream.
        second = open_cache(shuffle_cache).stream(**kw)
        second.load_state_dict(state)
        rest = [ex["example_id"] for ex in second]
        assert rest == ref[p:], f"resume at position {p} (state {state})"


def test_state_dict_refuses_other_seed(shuffle_cache):
    cache = open_cache(shuffle_cache)
    s = cache.stream(shuffle=True, seed=1, window=3)
    next(iter(s))
    other = cache.stream(shuffle=True, seed=2, window=3)
    with pytest.raises(ValueError, match="different seed"):
        other.load_state_dict(s.state_dict())


def test_keep_filter(shuffle_cache):
    cache = open_cache(shuffle_cache)
    keep = lambda eid: eid.endswith("0") or "#" in eid  # noqa: E731
    want = [i for i in expected_ids(0, N_SHUFFLE_ROWS) if keep(i)]
    assert [ex["example_id"] for ex in cache.stream(keep=keep)] == want
    got = [ex["example_id"] for ex in cache.stream(shuffle=True, seed=5, window=2, keep=keep)]
    assert sorted(got) == sorted(want)
    heldout = holdout_fraction_filter(0.3)
    train = [ex["example_id"] for ex in cache.stream(keep=lambda e: not heldout(e))]
    evals = [ex["example_id"] for ex in cache.stream(keep=heldout)]
    assert sorted(train + evals) == sorted(expected_ids(0, N_SHUFFLE_ROWS))
    assert not set(train) & set(evals)


def test_holdout_fraction_filter():
    ids = [str(i) for i in range(2000)]
    for fraction in (0.05, 0.1, 0.5):
        f = holdout_fraction_filter(fraction)
        held = [i for i in ids if f(i)]
        # Binomial(2000, p): 4 sigma is at most 0.045 here; the split is deterministic, so no flakiness.
        assert abs(len(held) / 2000 - fraction) < 4 * (fraction * (1 - fraction) / 2000) ** 0.5
        # Stable: a new filter (another process, another machine) makes the same split.
        assert held == [i for i in ids if holdout_fraction_filter(fraction)(i)]
        # Samples of one prompt go with their prompt.
        for i in ids[:300]:
            assert f(f"{i}#g1") == f(i) == f(f"{i}#g7")
    assert not any(holdout_fraction_filter(0.0)(i) for i in ids)
    assert all(holdout_fraction_filter(1.0)(i) for i in ids)
    # Nested: a smaller fraction is a subset of a larger one; another salt makes another split.
    small, big = holdout_fraction_filter(0.1), holdout_fraction_filter(0.3)
    assert all(big(i) for i in ids if small(i))
    assert [i for i in ids if small(i)] != [i for i in ids if holdout_fraction_filter(0.1, salt="other")(i)]


# --------------------------------------------------------------------------------------------------
# 3. Resume after a crash

N_RESUME_ROWS = 60


def _resume_and_check(path, *, strays=()):
    m = read_manifest(path)
    assert m.status == "in_progress" and len(m.shards) >= 2
    last_end = m.shards[-1].input_rows_end
    committed = {s.name for s in m.shards}
    for name in strays:
        (Path(path) / name).write_bytes(b"half a shard")
    w = CacheWriter(path, SETTINGS, SIGNALS, shard_tokens=120, row_group_tokens=40)
    assert not w.complete
    assert w.resume_input_row == last_end
    # In-flight work is gone: only the manifest and the committed shards remain.
    assert listing(path) == {MANIFEST_NAME} | committed
    for i in range(w.resume_input_row, N_RESUME_ROWS):
        w.add_row(row_examples(i), i + 1)
    w.close()
    assert_only_committed(path)
    ids = ids_of(path)
    assert ids == expected_ids(0, N_RESUME_ROWS)
    assert len(ids) == len(set(ids))
    # Content is intact across the resume boundary, not just ids.
    for ex, want in zip(open_cache(path).stream(), [e for i in range(N_RESUME_ROWS) for e in row_examples(i)]):
        np.testing.assert_array_equal(ex["topk_ids"], want["topk_ids"])
        np.testing.assert_array_equal(ex["topk_logprobs"], want["topk_logprobs"])
    # A writer on the finished cache, same settings: complete, nothing to do, and it refuses more rows.
    again = CacheWriter(path, SETTINGS, SIGNALS, shard_tokens=120, row_group_tokens=40)
    assert again.complete and again.resume_input_row == N_RESUME_ROWS
    with pytest.raises(KDCacheError, match="already complete.*--overwrite"):
        again.add_row(row_examples(0), 1)
    assert again.close().num_rows == len(ids)
    assert ids_of(path) == ids


def test_resume_after_abort(tmp_path):
    path = tmp_path / "c"
    w = write_rows(path, 0, 40)
    assert len(w.manifest.shards) >= 2
    assert any(p.startswith(".part-") for p in listing(path))  # a shard in flight
    w.abort()
    assert not any(p.endswith(".tmp") for p in listing(path))
    _resume_and_check(path, strays=[".part-00099.parquet.tmp", "part-00042.parquet"])


def test_resume_after_dropping_writer(tmp_path):
    path = tmp_path / "c"
    w = write_rows(path, 0, 40)
    committed = len(w.manifest.shards)
    assert committed >= 2 and any(p.startswith(".part-") for p in listing(path))
    del w
    gc.collect()
    assert len(read_manifest(path).shards) == committed
    _resume_and_check(path)


def test_resume_after_hard_crash(tmp_path):
    """A process killed mid-shard (os._exit: no cleanup, no finally) leaves a resumable cache."""
    path = tmp_path / "c"
    code = GEN_SRC + textwrap.dedent(
        f"""
        import os, sys
        from kdcache.cache import CacheWriter, make_signals
        w = CacheWriter(sys.argv[1], {SETTINGS!r}, make_signals(top_k=4, vocab_size=5000, logprob_codec="fp32"),
                        shard_tokens=120, row_group_tokens=40)
        for i in range(10_000):
            w.add_row(row_examples(i), i + 1)
            in_flight = any(p.startswith(".part-") for p in os.listdir(sys.argv[1]))
            if len(w.manifest.shards) >= 2 and in_flight:
                break
        print(len(w.manifest.shards), i, flush=True)
        os._exit(9)
        """
    )
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert int(r.stdout.split()[0]) >= 2 and int(r.stdout.split()[1]) < N_RESUME_ROWS
    assert any(p.startswith(".part-") and p.endswith(".tmp") for p in listing(path))
    _resume_and_check(path)


def test_bad_rows_at_the_end_are_recorded(tmp_path):
    path = tmp_path / "c"
    w = write_rows(path, 0, 20)
    for i in range(20, 25):
        w.count("bad_row")
        w.add_row([], i + 1)
    m = w.close()
    assert m.shards[-1].input_rows_end == 25
    assert read_manifest(path).stats == {"bad_row": 5}
    assert CacheWriter(path, SETTINGS, SIGNALS, shard_tokens=120, row_group_tokens=40).resume_input_row == 25


def test_empty_cache(tmp_path):
    path = tmp_path / "c"
    CacheWriter(path, SETTINGS, SIGNALS).close()
    cache = open_cache(path)
    assert len(cache) == 0 and list(cache.stream(epochs=3)) == [] and cache.manifest.status == "complete"


# --------------------------------------------------------------------------------------------------
# 4. Refusals


def test_different_settings_refused_then_overwrite_replaces(tmp_path):
    path = tmp_path / "c"
    write_rows(path, 0, 30).close()
    before = read_manifest(path)
    other = {**SETTINGS, "teacher": {"name": "other-teacher", "revision": "abc"}}
    with pytest.raises(CacheMismatchError) as info:
        CacheWriter(path, other, SIGNALS)
    msg = str(info.value)
    assert "different settings" in msg and "teacher.name" in msg and "--overwrite" in msg and str(path) in msg
    with pytest.raises(CacheMismatchError, match="topk.*--overwrite"):
        CacheWriter(path, SETTINGS, make_signals(top_k=8, vocab_size=5000, logprob_codec="fp32"))
    # Refusals change nothing.
    assert read_manifest(path).to_json() == before.to_json()
    assert_only_committed(path)

    (path / TOKENIZER_DIR).mkdir()
    w = CacheWriter(path, other, SIGNALS, overwrite=True, shard_tokens=10_000)
    assert listing(path) == {MANIFEST_NAME}  # old shards and tokenizer are gone
    for i in range(5):
        w.add_row(row_examples(i), i + 1)
    w.close()
    m = read_manifest(path)
    assert m.teacher["name"] == "other-teacher" and len(m.shards) == 1
    assert ids_of(path) == expected_ids(0, 5)
    # overwrite=True with the same settings regenerates rather than resuming.
    w = CacheWriter(path, other, SIGNALS, overwrite=True)
    assert not w.complete and w.resume_input_row == 0 and listing(path) == {MANIFEST_NAME}


def test_non_empty_non_cache_directory_refused(tmp_path):
    path = tmp_path / "mine"
    path.mkdir()
    (path / "notes.txt").write_text("precious")
    with pytest.raises(CacheMismatchError) as info:
        CacheWriter(path, SETTINGS, SIGNALS)
    msg = str(info.value)
    assert "not empty" in msg and "not a kdcache cache" in msg and "--overwrite" in msg
    assert (path / "notes.txt").read_text() == "precious"
    assert listing(path) == {"notes.txt"}
    # --overwrite replaces caches, never someone's other files.
    with pytest.raises(CacheMismatchError, match="never other files"):
        CacheWriter(path, SETTINGS, SIGNALS, overwrite=True)
    assert listing(path) == {"notes.txt"}


def test_damaged_manifest_refused_by_writer(tmp_path):
    path = tmp_path / "c"
    write_rows(path, 0, 10).close()
    (path / MANIFEST_NAME).write_text("{ not json")
    with pytest.raises(CacheFormatError, match="not valid JSON.*regenerate"):
        CacheWriter(path, SETTINGS, SIGNALS)
    with pytest.raises(CacheFormatError, match="not valid JSON"):
        open_cache(path)
    CacheWriter(path, SETTINGS, SIGNALS, overwrite=True).close()
    assert len(open_cache(path)) == 0


def test_open_cache_refusals(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CacheFormatError, match="does not exist.*kdcache generate"):
        open_cache(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CacheFormatError, match="not a kdcache cache.*manifest.json"):
        open_cache(empty)

    path = tmp_path / "c"
    write_rows(path, 0, 10).close()
    data = json.loads((path / MANIFEST_NAME).read_text())
    data["format_version"] = 999
    (path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(CacheFormatError) as info:
        open_cache(path)
    msg = str(info.value)
    assert "format version 999" in msg and "reads versions 1, 2" in msg and "regenerate" in msg
    data["format_version"] = 1
    data["surprise"] = 1
    (path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(CacheFormatError, match="unexpected fields"):
        open_cache(path)


def test_missing_or_damaged_shard(tmp_path):
    path = tmp_path / "c"
    write_rows(path, 0, 40).close()
    m = read_manifest(path)
    victim = path / m.shards[1].name
    victim.unlink()
    with pytest.raises(CacheFormatError) as info:
        list(open_cache(path).stream())
    msg = str(info.value)
    assert m.shards[1].name in msg and "missing" in msg and "regenerate" in msg

    path2 = tmp_path / "d"
    write_rows(path2, 0, 40).close()
    shard = path2 / read_manifest(path2).shards[0].name
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CacheFormatError, match="not readable Parquet.*regenerate"):
        list(open_cache(path2).stream())


def test_unwritable_directory(tmp_path):
    path = tmp_path / "ro"
    path.mkdir()
    os.chmod(path, 0o500)
    try:
        probe = path / "probe"
        try:
            probe.write_bytes(b"")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("running as root: a read-only mode does not stop writes")
        with pytest.raises(KDCacheError, match="not writable.*choose another --out"):
            CacheWriter(path / "cache", SETTINGS, SIGNALS)
        with pytest.raises(KDCacheError, match="not writable"):
            CacheWriter(path, SETTINGS, SIGNALS)
    finally:
        os.chmod(path, 0o700)


def test_output_path_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(KDCacheError, match="not writable.*choose another --out"):
        CacheWriter(path, SETTINGS, SIGNALS)


# --------------------------------------------------------------------------------------------------
# 5. Full disk (real EFBIG via RLIMIT_FSIZE in a subprocess)

FULL_SETTINGS = {"teacher": {"name": "full"}, "tokenizer": {"vocab_size": 1000}}
FULL_SRC = GEN_SRC + textwrap.dedent(
    f"""
    import resource, signal, sys
    from kdcache.cache import CacheWriter, make_signals
    from kdcache.errors import OutOfSpaceError

    def big_row(i, T=32, k=8, vocab=1000):
        # Rows < 30 compress to almost nothing; later rows are random, so later shards are large.
        rng = np.random.default_rng(i)
        z = i < 30
        return [{{
            "example_id": str(i),
            "input_ids": np.zeros(T, np.int64) if z else rng.integers(0, vocab, T),
            "loss_mask": np.ones(T - 1, bool),
            "topk_ids": np.zeros((T - 1, k), np.int64) if z else rng.integers(0, vocab, (T - 1, k)),
            "topk_logprobs": np.zeros((T - 1, k), np.float32) if z else -rng.random((T - 1, k), dtype=np.float32) * 10,
            "tail_logprob": np.zeros(T - 1, np.float32),
            "teacher_nll": 1.0, "teacher_entropy": 2.0, "num_loss_tokens": T - 1,
        }}]

    path, limit, n_rows, shard_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    if limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with CacheWriter(path, {FULL_SETTINGS!r}, make_signals(top_k=8, vocab_size=1000, logprob_codec="fp32"),
                         shard_tokens=shard_tokens, row_group_tokens=64) as w:
            print("RESUME", w.resume_input_row, flush=True)
            for i in range(w.resume_input_row, n_rows):
                w.add_row(big_row(i), i + 1)
        print("DONE")
    except Exception as exc:
        print("ERROR", type(exc).__name__, isinstance(exc, OutOfSpaceError))
        print("MESSAGE", exc)
    """
)


def _run_full(path, limit, n_rows, shard_tokens):
    r = subprocess.run(
        [sys.executable, "-c", FULL_SRC, str(path), str(limit), str(n_rows), str(shard_tokens)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_out_of_space_then_resume(tmp_path):
    path = tmp_path / "c"
    # Shards of 10 rows: the compressible ones are ~8 KB, the random ones ~22 KB, over the 15 KB limit.
    out = _run_full(path, 15_000, 60, 320)
    assert "ERROR OutOfSpaceError True" in out, out
    assert "free disk space" in out and "rerun" in out
    assert_only_committed(path)  # no .tmp files, no unlisted shards, the manifest parses
    m = read_manifest(path)
    assert m.status == "in_progress" and len(m.shards) == 3 and m.shards[-1].input_rows_end == 30
    assert f"after the {len(m.shards)} committed shards" in out
    assert [ex["example_id"] for ex in open_cache(path).stream()] == [str(i) for i in range(30)]

    out = _run_full(path, 0, 60, 320)
    assert "RESUME 30" in out and "DONE" in out, out
    assert_only_committed(path)
    ids = [ex["example_id"] for ex in open_cache(path).stream()]
    assert ids == [str(i) for i in range(60)]
    assert read_manifest(path).status == "complete"


# --------------------------------------------------------------------------------------------------
# 6. Interoperability: the shards are plain Parquet


@pytest.fixture(scope="module")
def interop_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("interop") / "c"
    signals = make_signals(top_k=4, vocab_size=5000, hidden_layers=[2], hidden_size=3, generation=True)
    rng = np.random.default_rng(0)
    examples = [make_example(rng, f"{i}#g0", 6, 4, 5000, [2], 3, (2, 0)) for i in range(8)]
    with CacheWriter(path, SETTINGS, signals) as w:
        for i, ex in enumerate(examples):
            w.add_row([ex], i + 1)
    return path, examples


def test_pyarrow_reads_shard(interop_cache):
    path, examples = interop_cache
    shard = path / read_manifest(path).shards[0].name
    table = pq.read_table(shard)
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("topk_ids").type == pa.list_(pa.int32())
    assert table.schema.field("loss_mask").type == pa.list_(pa.bool_())
    assert table.schema.field("topk_logprobs").type == pa.list_(pa.float16())
    assert table.schema.field("hidden_2").type == pa.list_(pa.float16())
    assert table.schema.metadata[b"kdcache.format_version"] == b"1"  # plain lists: format 1, as before format 2 existed
    assert table.column("input_ids").to_pylist() == [ex["input_ids"].tolist() for ex in examples]
    assert table.column("topk_ids").to_pylist()[0] == examples[0]["topk_ids"].reshape(-1).tolist()
    meta = pq.ParquetFile(shard).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_datasets_reads_shard(interop_cache, tmp_path):
    import datasets

    path, examples = interop_cache
    shard = path / read_manifest(path).shards[0].name
    ds = datasets.Dataset.from_parquet(str(shard), cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(examples)
    assert ds[3]["example_id"] == "3#g0"
    assert ds[3]["input_ids"] == examples[3]["input_ids"].tolist()
    assert ds[3]["topk_ids"] == examples[3]["topk_ids"].reshape(-1).tolist()
    assert ds[3]["prompt_length"] == 2
    assert "int32" in str(ds.features["input_ids"])


def test_pandas_reads_shard(interop_cache):
    import pandas as pd

    path, examples = interop_cache
    df = pd.read_parquet(path / read_manifest(path).shards[0].name)
    assert list(df["example_id"]) == [ex["example_id"] for ex in examples]
    assert list(df["input_ids"].iloc[5]) == examples[5]["input_ids"].tolist()
    assert df["num_loss_tokens"].tolist() == [int(ex["loss_mask"].sum()) for ex in examples]


# --------------------------------------------------------------------------------------------------
# Regressions: bugs these tests found in kdcache/cache, now fixed


def test_keep_filter_with_column_projection(shuffle_cache):
    """Regression: ``keep`` read example_id from the block, which is missing when ``columns`` leaves it out (KeyError)."""
    cache = open_cache(shuffle_cache)
    keep = lambda eid: "#" in eid  # noqa: E731
    want = [i for i in expected_ids(0, N_SHUFFLE_ROWS) if keep(i)]
    got = list(cache.stream(columns=["input_ids"], keep=keep))
    assert len(got) == len(want)
    assert all(set(ex) <= {"input_ids", "example_id"} for ex in got)


def test_out_of_space_while_updating_manifest(tmp_path):
    """Regression: when the manifest update failed (EFBIG/ENOSPC) right after a shard was renamed into place,
    the writer leaves that renamed ``part-N.parquet`` behind although the manifest on disk does not list
    it, and its message counts it as committed ("resumes after the N+1 committed shards")."""
    path = tmp_path / "c"
    # Two rows per shard, tiny shards: the manifest is the first file to outgrow the 9 KB limit.
    out = _run_full(path, 9_000, 80, 32)
    assert "ERROR OutOfSpaceError True" in out, out
    m = read_manifest(path)
    assert m.status == "in_progress" and len(m.shards) >= 2
    committed = {MANIFEST_NAME} | {s.name for s in m.shards}
    left_over = sorted(listing(path) - committed)
    message_ok = f"after the {len(m.shards)} committed shards" in out
    # What works today: the manifest parses, lists intact shards, and the rerun resumes with every row once.
    assert [ex["example_id"] for ex in open_cache(path).stream()] == [str(i) for i in range(m.shards[-1].input_rows_end)]
    rerun = _run_full(path, 0, 80, 32)
    assert f"RESUME {m.shards[-1].input_rows_end}" in rerun and "DONE" in rerun, rerun
    assert_only_committed(path)
    assert [ex["example_id"] for ex in open_cache(path).stream()] == [str(i) for i in range(80)]
    # The bug: an uncommitted shard left on the full disk, and a message that miscounts the committed shards.
    assert left_over == [], f"uncommitted files left after OutOfSpaceError: {left_over}"
    assert message_ok, f"manifest lists {len(m.shards)} shards but the error said: {out.strip()}"
