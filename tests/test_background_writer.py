"""The writer thread: the same cache bytes as writing in the teacher's thread, a bounded queue, and a failure
that surfaces in the caller, stops all later writes and leaves the cache at its last commit."""

from __future__ import annotations

import errno
import threading

import pytest

from kdcache.cache import CacheWriter, make_signals, read_manifest
from kdcache.cache.background import BackgroundWriter
from kdcache.cache.verify import verify_cache
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.generate import generate


def _generate(teacher, data, out, **kw):
    return generate(GenerateConfig(teacher=str(teacher), out=str(out), top_k=8, row_group_tokens=256, shard_tokens=1024,
                                   data=DataConfig(source=str(data), max_length=64), **kw), progress=False)


def test_the_writer_thread_writes_the_same_bytes(tiny_teacher, text_jsonl, tmp_path):
    inline = _generate(tiny_teacher, text_jsonl, tmp_path / "inline", write_queue=0)
    queued = _generate(tiny_teacher, text_jsonl, tmp_path / "queued", write_queue=3)
    assert len(inline.shards) > 1  # several commits happened through the queue
    assert [(s.name, s.sha256, s.rows) for s in inline.shards] == [(s.name, s.sha256, s.rows) for s in queued.shards]
    assert inline.stats == queued.stats and inline.num_rows == queued.num_rows


class _GatedWriter:
    """Stands in for a writer on a stalled disk: every add_row waits for the gate."""

    def __init__(self):
        self.gate, self.rows, self.stats = threading.Event(), [], {}

    def add_row(self, examples, end):
        self.gate.wait()
        self.rows.append(end)


def test_a_stalled_writer_holds_the_caller_back_after_depth_calls():
    w = _GatedWriter()
    bg = BackgroundWriter(w, depth=4)
    done: list[int] = []

    def caller():
        for i in range(10):
            bg.add_row([], i + 1)
            done.append(i)

    t = threading.Thread(target=caller, daemon=True)
    t.start()
    try:
        t.join(timeout=1.0)
        assert t.is_alive() and len(done) == 4  # four calls queued, the fifth waits for a slot
    finally:
        w.gate.set()
    t.join(timeout=30)
    bg.drain()
    assert w.rows == list(range(1, 11))  # in order, all of them


def _example(i: int, n: int = 40):
    import numpy as np

    rng = np.random.default_rng(i)
    ids = np.stack([rng.choice(100, 4, replace=False) for _ in range(n - 1)]).astype(np.int32)
    lp = np.sort(np.log(rng.dirichlet(np.ones(5), n - 1))[:, :4], axis=1)[:, ::-1].astype(np.float32)
    return {"example_id": str(i), "input_ids": rng.integers(0, 100, n, dtype=np.int32), "loss_mask": np.ones(n - 1, bool),
            "topk_ids": ids, "topk_logprobs": lp, "tail_logprob": np.log1p(-np.exp(lp).sum(1)).astype(np.float32),
            "teacher_nll": 1.0, "teacher_entropy": 1.0, "num_loss_tokens": n - 1}


def test_a_failure_in_the_thread_is_raised_to_the_caller_and_nothing_after_it_is_written(tmp_path, monkeypatch):
    out = tmp_path / "c"
    writer = CacheWriter(out, {"t": 1}, make_signals(4, 100), shard_tokens=200, row_group_tokens=100)
    real = CacheWriter._flush_row_group
    flushes = {"n": 0}

    queued = threading.Event()

    def failing_flush(self, *a, **kw):  # the disk fills on the 4th row group, once every row is queued behind it
        flushes["n"] += 1
        if flushes["n"] == 4:
            queued.wait(timeout=30)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **kw)

    monkeypatch.setattr(CacheWriter, "_flush_row_group", failing_flush)
    bg = BackgroundWriter(writer, depth=200)
    for i in range(100):
        bg.add_row([_example(i)], i + 1)
    queued.set()
    with pytest.raises(OSError, match="No space"):
        bg.close()
    assert flushes["n"] == 4 and writer.rows_added < 20  # nothing queued after the failure ran
    bg.abort()
    committed = read_manifest(out)
    assert committed.status == "in_progress" and 0 < committed.num_rows < 100
    monkeypatch.setattr(CacheWriter, "_flush_row_group", real)
    assert verify_cache(out, deep=True).ok  # what was committed is whole
    resumed = CacheWriter(out, {"t": 1}, make_signals(4, 100), shard_tokens=200, row_group_tokens=100)
    start = resumed.resume_input_row
    with BackgroundWriter(resumed) as bg2:
        for i in range(start, 100):
            bg2.add_row([_example(i)], i + 1)
    final = read_manifest(out)
    assert final.status == "complete" and final.num_rows == 100
