"""A run decodes only what its loss needs: a CE run never reads the top-k (most of a cache's bytes)."""

from __future__ import annotations

import pytest

from kdcache.cache.reader import Cache
from kdcache.train import TrainConfig, train

TOPK = {"topk_ids", "topk_logprobs", "tail_logprob"}


def _train_stream_columns(monkeypatch, cache, out, **kw) -> list[set[str]]:
    seen: list[set[str]] = []
    original = Cache.stream

    def recording(self, *args, **kwargs):  # records what was asked for, then reads for real
        if kwargs.get("shuffle"):  # the training stream (held-out batches are read unshuffled)
            seen.append(set(kwargs.get("columns") or []))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Cache, "stream", recording)
    train(TrainConfig(cache=str(cache), out=str(out), steps=2, save_every=0, eval_fraction=0.1, **kw), progress=False)
    return seen


@pytest.mark.parametrize("loss,want", [("ce", set()), ("kd", TOPK), ("tfkd", set())])
def test_training_stream_reads_only_the_losss_signals(monkeypatch, tiny_cache, tmp_path, loss, want):
    (cols,) = _train_stream_columns(monkeypatch, tiny_cache, tmp_path / loss, loss=loss)
    assert cols & (TOPK | {"sampled_ids", "sampled_weights", "sampled_sizes"}) == want
    assert {"input_ids", "loss_mask"} <= cols


def test_pseudo_teacher_reads_no_teacher_signal(monkeypatch, tiny_cache, tmp_path):
    (cols,) = _train_stream_columns(monkeypatch, tiny_cache, tmp_path / "ema", loss="kd", pseudo_teacher="ema")
    assert not cols & TOPK
