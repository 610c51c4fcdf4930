"""Interrupting ``generate`` keeps work, bounded by time, and says what it kept.

Real processes only: ``python -m kdcache generate`` with the tiny teacher, stopped by a real SIGINT at a
random moment after the first time-bound commit, then rerun with the same command. The rerun's cache must
equal an uninterrupted run's, row for row and column for column. The writer's time bound is checked with a
real writer and a slow producer (the sleeps are in the test, never in kdcache).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import _sentences, sigint_as_in_a_terminal
from kdcache.cache import MANIFEST_NAME, CacheWriter, make_signals, open_cache, read_manifest
from kdcache.errors import ConfigError, KDCacheError
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.generate import _interrupted, generate

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ROWS = 1000


@pytest.fixture(scope="module")
def long_jsonl(tmp_path_factory) -> Path:
    """Enough rows that the tiny teacher works for a few seconds: several time-bound commits."""
    path = tmp_path_factory.mktemp("interrupt") / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(ROWS, seed=5)))
    return path


def command(teacher: Path, data: Path, out: Path, commit_seconds: float, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "kdcache", "generate", "--teacher", str(teacher), "--dataset", str(data), "--out", str(out),
        "--top-k", "4", "--max-length", "48", "--quiet", "--set", "device=cpu", "--set", "logprob_codec=fp32",
        "--set", "batch_tokens=256", "--set", "row_group_tokens=512", "--set", f"commit_seconds={commit_seconds}", *extra,
    ]


def wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return
        time.sleep(0.005)
    _, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
    pytest.fail(f"generate ended (or timed out) before {what}: rc {proc.returncode}, stderr {err[-2000:]}")


def listed_shards(out: Path) -> int:
    try:
        return len(json.loads((out / MANIFEST_NAME).read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def interrupt(proc: subprocess.Popen, sig: int = signal.SIGINT) -> tuple[int, str]:
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    # -SIGINT and a summary on stdout: the run had finished and was exiting (Python restores the default
    # handler at shutdown); the data is too small for this machine, not a kdcache failure.
    assert "(complete)" not in out, f"generate finished before the SIGINT arrived; use more rows: {out}"
    return proc.returncode, err


def interrupted_line(err: str) -> str:
    """The one line the CLI prints for Interrupted; nothing else of it (no traceback) may be on stderr."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def assert_same_rows(a: Path, b: Path) -> None:
    """Every column of every row, in stored order. Logits of a row do not depend on which rows share its
    batch, up to float summation order, hence the 1e-5 on the float columns."""
    xs, ys = list(open_cache(a)), list(open_cache(b))
    assert [x["example_id"] for x in xs] == [y["example_id"] for y in ys]
    for x, y in zip(xs, ys):
        assert set(x) == set(y)
        for key in x:
            if isinstance(x[key], str) or np.asarray(x[key]).dtype.kind in "iub":
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"{key} of {x['example_id']}")
            else:
                np.testing.assert_allclose(x[key], y[key], atol=1e-5, rtol=0, err_msg=f"{key} of {x['example_id']}")


def test_sigint_keeps_committed_shards_reports_them_and_the_rerun_equals_an_uninterrupted_run(tiny_teacher, long_jsonl, tmp_path):
    seed = random.randrange(2**32)
    delay = random.Random(seed).uniform(0.0, 0.3)
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(command(tiny_teacher, long_jsonl, out, 0.1), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal)
    try:
        wait_until(proc, lambda: listed_shards(out) >= 1, "the first shard was committed")
        time.sleep(delay)
        assert proc.poll() is None, f"generate finished before the SIGINT (delay {delay:.3f} s, seed {seed}); use more rows"
        rc, err = interrupt(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130, (rc, err)
    line = interrupted_line(err)
    kept = read_manifest(out)
    assert kept.status == "in_progress" and kept.shards and kept.shards[-1].input_rows_end < ROWS, (line, seed)
    n = len(kept.shards)
    end = kept.shards[-1].input_rows_end
    assert line == (
        f"interrupted: kept {n:,} shard{'' if n == 1 else 's'} ({kept.num_rows:,} rows, {kept.num_tokens:,} tokens, "
        f"input rows 0-{end - 1}) in {out}; rerun the same command to resume"
    ), f"seed {seed}"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # the shard in flight was dropped
    # The time bound, not the token bound, committed them: each holds far fewer than shard_tokens.
    assert all(s.tokens < 4_000_000 for s in kept.shards)

    rerun = subprocess.run(command(tiny_teacher, long_jsonl, out, 0.1), env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming after input row {end}" in rerun.stderr
    whole = tmp_path / "whole"
    generate(GenerateConfig(teacher=str(tiny_teacher), out=str(whole), device="cpu", top_k=4, logprob_codec="fp32", batch_tokens=256,
                            row_group_tokens=512, data=DataConfig(source=str(long_jsonl), max_length=48)), progress=False)
    assert read_manifest(out).status == "complete" and read_manifest(out).num_rows == read_manifest(whole).num_rows == ROWS
    assert_same_rows(out, whole)
    # ...and a student trains on it in the same order: the same reader units, the same shuffled stream
    assert _units(out) == _units(whole)
    order = lambda p: [ex["example_id"] for ex in open_cache(p).stream(shuffle=True, seed=1, columns=["example_id"])]  # noqa: E731
    assert order(out) == order(whole)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_before_any_commit_says_nothing_was_kept_and_leaves_no_folder(tiny_teacher, long_jsonl, tmp_path, sig):
    out = tmp_path / "fresh"
    proc = subprocess.Popen(command(tiny_teacher, long_jsonl, out, 1000), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal)
    try:
        # A row group in flight: the teacher is working, nothing is committed (1000 s, 4M tokens).
        wait_until(proc, lambda: out.is_dir() and any(p.name.endswith(".parquet.tmp") for p in out.iterdir()), "a row group was written")
        rc, err = interrupt(proc, sig)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130, (rc, err)
    assert interrupted_line(err) == (
        "interrupted: nothing was committed yet (a shard commits every 1000 s of teacher work: --set commit_seconds=...); "
        "rerun the same command to start over"
    )
    assert not out.exists()  # this run created it and committed nothing: removed, as on any failure


def test_the_message_counts_a_single_shard_in_the_singular(tiny_teacher, text_jsonl, tmp_path):
    cfg = GenerateConfig(teacher=str(tiny_teacher), out=str(tmp_path / "one"), device="cpu", top_k=4,
                         data=DataConfig(source=str(text_jsonl), max_length=16, max_rows=3))
    m = generate(cfg, progress=False)
    assert len(m.shards) == 1 and m.num_rows == 3
    assert str(_interrupted(cfg, opened=True)) == (
        f"kept 1 shard (3 rows, {m.num_tokens:,} tokens, input rows 0-2) in {cfg.out}; rerun the same command to resume"
    )
    assert "nothing was written by this run" in str(_interrupted(cfg, opened=False))


SIGNALS = make_signals(2, 50, "fp32")
SETTINGS = {"teacher": {"name": "slow"}, "tokenizer": {"vocab_size": 50}, "dataset": {"name": "d"}}


def row(i: int, T: int = 6) -> dict:
    rng = np.random.default_rng(i)
    return {
        "example_id": str(i), "input_ids": rng.integers(0, 50, T).astype(np.int32), "loss_mask": np.ones(T - 1, bool),
        "topk_ids": rng.integers(0, 50, (T - 1, 2)).astype(np.int32),
        "topk_logprobs": np.full((T - 1, 2), -1.0, np.float32), "tail_logprob": np.full(T - 1, -2.0, np.float32),
        "teacher_nll": 1.0, "teacher_entropy": 1.0, "num_loss_tokens": T - 1,
    }


def test_a_slow_producer_commits_every_commit_seconds_and_a_fast_one_by_tokens(tmp_path):
    slow = CacheWriter(tmp_path / "slow", SETTINGS, SIGNALS, shard_tokens=10**6, row_group_tokens=10**5, commit_seconds=0.15)
    committed_at = []
    for i in range(12):
        before = len(slow.manifest.shards)
        slow.add_row([row(i)], i + 1)
        if len(slow.manifest.shards) > before:
            committed_at.append(i)
        time.sleep(0.05)  # a slow teacher
    # Rows 0..3 arrive at 0, 50, 100, 150 ms: the shard is committed with row 3, then with rows 7 and 11
    # (a loaded machine only makes the gaps longer, so never fewer commits than that).
    assert len(committed_at) >= 3 and committed_at[0] <= 3, committed_at
    listed = read_manifest(tmp_path / "slow")
    assert [s.input_rows_end - 1 for s in listed.shards] == committed_at
    assert all(s.row_groups == [s.rows] for s in listed.shards)  # the pending row group went into the shard
    slow.close()
    assert [ex["example_id"] for ex in open_cache(tmp_path / "slow")] == [str(i) for i in range(12)]

    fast = CacheWriter(tmp_path / "fast", SETTINGS, SIGNALS, shard_tokens=30, row_group_tokens=12, commit_seconds=60)
    for i in range(20):
        fast.add_row([row(i)], i + 1)
    m = fast.close()
    assert [s.row_groups for s in m.shards] == [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2]]  # 6-token rows: 12 per group, 30+ per shard


def _units(path) -> list[int]:
    cache = open_cache(path)
    return [sum(cache.row_groups[g][2] for g in unit) for unit in cache.units]


def test_time_bounded_commits_do_not_change_what_training_reads(tmp_path):
    """A slow teacher's cache (committed every commit_seconds, row groups cut short) holds the same row
    groups, as reader units, as a fast teacher's, and a shuffled stream reads it in the same order: the
    order a student trains in does not depend on the machine's speed or on where a run was stopped."""
    slow = CacheWriter(tmp_path / "slow", SETTINGS, SIGNALS, shard_tokens=10**6, row_group_tokens=24, commit_seconds=0.07)
    for i in range(16):
        slow.add_row([row(i)], i + 1)
        time.sleep(0.05)
    slow.close()
    fast = CacheWriter(tmp_path / "fast", SETTINGS, SIGNALS, shard_tokens=10**6, row_group_tokens=24, commit_seconds=60)
    for i in range(16):
        fast.add_row([row(i)], i + 1)
    fast.close()
    slow_m = read_manifest(tmp_path / "slow")
    assert len(slow_m.shards) >= 3 and any(s.open_tokens for s in slow_m.shards[:-1])  # cut short, more than once
    assert _units(tmp_path / "slow") == _units(tmp_path / "fast") == [4, 4, 4, 4]  # 6-token rows: 24 per group
    order = lambda p: [ex["example_id"] for ex in open_cache(p).stream(shuffle=True, seed=3, window=2, columns=["example_id"])]  # noqa: E731
    assert order(tmp_path / "slow") == order(tmp_path / "fast")


def test_shards_smaller_than_row_groups_cap_the_row_group(tmp_path):
    w = CacheWriter(tmp_path / "c", SETTINGS, SIGNALS, shard_tokens=12, row_group_tokens=1000)
    for i in range(6):
        w.add_row([row(i)], i + 1)
    m = w.close()
    assert [s.row_groups for s in m.shards] == [[2], [2], [2]]


@pytest.mark.parametrize("value", [0, -1])
def test_commit_seconds_must_be_positive(value):
    with pytest.raises(ConfigError, match=re.escape(f"commit_seconds must be positive, got {value}")):
        GenerateConfig(teacher="t", out="o", commit_seconds=value)


@pytest.mark.parametrize("value", [0, float("nan")])
def test_the_writer_refuses_a_time_bound_that_is_not_positive(tmp_path, value):
    with pytest.raises(KDCacheError, match=re.escape(f"commit_seconds ({value}) positive or None")):
        CacheWriter(tmp_path / "c", SETTINGS, SIGNALS, commit_seconds=value)
    assert not (tmp_path / "c").exists()


def test_the_summary_counts_truncated_rows(tiny_teacher, text_jsonl, tmp_path, caplog):
    """Not an interruption, but the same end-of-run honesty: rows cut to max_length are counted aloud."""
    cfg = GenerateConfig(teacher=str(tiny_teacher), out=str(tmp_path / "t"), device="cpu", top_k=4,
                         data=DataConfig(source=str(text_jsonl), max_length=8, max_rows=6))
    with caplog.at_level("WARNING", logger="kdcache.pipeline.generate"):
        m = generate(cfg, progress=False)
    n = m.stats["truncated_rows"]
    assert n >= 1
    assert f"{n} of 6 rows {'was' if n == 1 else 'were'} longer than max_length 8" in caplog.text and "raise --max-length" in caplog.text


def test_the_interrupt_message_without_timed_commits_names_the_token_commits(tmp_path):
    import dataclasses

    from kdcache.pipeline.config import GenerateConfig
    from kdcache.pipeline.generate import _interrupted

    cfg = dataclasses.replace(GenerateConfig(teacher="t", out=str(tmp_path / "never-written")), commit_seconds=None)
    msg = str(_interrupted(cfg, opened=True))  # commit_seconds=None used to raise in the f-string
    assert "nothing was committed yet" in msg and f"every {cfg.shard_tokens} tokens" in msg
