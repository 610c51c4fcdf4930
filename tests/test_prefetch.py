"""Batches made ahead in a thread: the same batches and reader states as without, errors where they happened,
read-ahead that really happens, and a run that trains bit-identically with or without it."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kdcache.cache import open_cache
from kdcache.train import train
from kdcache.train.curriculum import CurriculumConfig
from kdcache.train.data import batches, collate
from kdcache.train.prefetch import Prefetcher
from test_train import assert_same_weights, final_weights, make_cfg, rows


class Counter:
    """A batch source with a position, like the cache stream: the state after batch i is i + 1."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at, self.pos = n, fail_at, 0

    def __iter__(self):
        while self.pos < self.n:
            if self.pos == self.fail_at:
                raise RuntimeError(f"bad row group at {self.pos}")
            self.pos += 1
            yield self.pos * 10

    def state(self) -> dict:
        return {"pos": self.pos}


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_every_batch_comes_with_the_state_after_it(depth):
    src = Counter(7)
    with Prefetcher(iter(src), src.state, depth) as p:
        got = list(p)
    assert got == [(10 * i, {"pos": i}) for i in range(1, 8)]


@pytest.mark.parametrize("depth", [0, 2])
def test_a_producer_error_is_raised_in_the_consumer_after_the_batches_before_it(depth):
    src = Counter(9, fail_at=4)
    p = Prefetcher(iter(src), src.state, depth)
    assert [next(p)[0] for _ in range(4)] == [10, 20, 30, 40]
    with pytest.raises(RuntimeError, match="bad row group at 4"):
        next(p)
    with pytest.raises(RuntimeError):  # and again, not a hang
        next(p)
    p.close()


def test_the_producer_reads_ahead_while_the_consumer_is_busy_and_stops_on_close():
    src = Counter(1000)
    p = Prefetcher(iter(src), src.state, depth=3)
    next(p)
    deadline = time.monotonic() + 30
    while p.produced < 1 + 3 and time.monotonic() < deadline:  # one taken, three waiting (the queue's bound)...
        time.sleep(0.01)
    time.sleep(0.05)
    assert p.produced in (4, 5)  # ...plus at most the one in hand: bounded, not the whole source
    p.close()
    assert not any(t.name == "kdcache-prefetch" and t.is_alive() for t in threading.enumerate())


def test_collated_batches_keep_the_cache_dtypes_until_the_device(tiny_cache):
    cache = open_cache(tiny_cache, topk_order="any", keep_float16=True)
    cols = ["example_id", "input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logprob", "teacher_nll", "num_loss_tokens"]
    b = next(batches(cache.stream(columns=cols), 4, collate_fn=collate))
    stored = open_cache(tiny_cache).manifest.signals["topk"]["columns"]
    assert b.targets.topk_ids.dtype == torch.int32
    if stored["topk_logprobs"].get("dtype") == "float16":
        assert b.targets.topk_logprobs.dtype == torch.float16
    moved = b.to(torch.device("cpu"))
    assert moved.targets.topk_ids.dtype == torch.int64 and moved.targets.topk_logprobs.dtype == torch.float32
    assert torch.equal(moved.targets.topk_ids, b.targets.topk_ids.long())
    assert torch.equal(moved.targets.topk_logprobs, b.targets.topk_logprobs.float())


def without_timing(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "tokens_per_s"}


def test_a_run_trains_the_same_with_and_without_prefetch(tiny_cache, tmp_path):
    # a curriculum asks for the step while the stream is read: the answer must not depend on the thread's timing
    common = dict(steps=10, batch_size=4, grad_accum=2, save_every=5, curriculum=CurriculumConfig(by="teacher_nll", start=0.3, full_at=0.8))
    train(make_cfg(tiny_cache, tmp_path / "sync", prefetch=0, **common), progress=False)
    train(make_cfg(tiny_cache, tmp_path / "ahead", prefetch=4, **common), progress=False)
    assert_same_weights(final_weights(tmp_path / "sync"), final_weights(tmp_path / "ahead"))
    assert [without_timing(r) for r in rows(tmp_path / "sync")] == [without_timing(r) for r in rows(tmp_path / "ahead")]
