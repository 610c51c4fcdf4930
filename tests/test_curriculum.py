"""Curriculum by the teacher's per-example difficulty: the pacing, what the stream admits, what a run
trains on, and exact resume across the pacing."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from kdcache.cache import holdout_fraction_filter, open_cache
from kdcache.train import train
from kdcache.train.curriculum import Curriculum, CurriculumConfig, competence, training_difficulties
from test_train import final_weights, make_cfg, assert_same_weights


@settings(max_examples=200, deadline=None)
@given(pacing=st.sampled_from(["linear", "root", "step"]), start=st.floats(0.01, 1.0), full_at=st.floats(0.0, 1.0),
       stages=st.integers(1, 10), steps=st.integers(1, 500))
def test_competence_starts_at_start_grows_and_reaches_one(pacing, start, full_at, stages, steps):
    cfg = CurriculumConfig(by="teacher_nll", pacing=pacing, start=start, full_at=full_at, stages=stages)
    c = [competence(cfg, s, steps) for s in range(steps + 1)]
    assert all(0 < x <= 1 for x in c)
    assert all(b >= a - 1e-12 for a, b in zip(c, c[1:]))  # never shrinks
    assert c[0] == pytest.approx(start) or full_at * steps <= 0
    assert all(x == 1.0 for s, x in enumerate(c) if s >= full_at * steps)
    if pacing == "step" and full_at * steps >= 2 * stages:  # at most `stages` + 1 levels
        assert len({round(x, 12) for x in c}) <= stages + 1


def _difficulties_by_hand(cache_path, fraction):
    """The training examples' teacher_nll straight from the Parquet files (independent of the code under test)."""
    is_heldout = holdout_fraction_filter(fraction)
    cache = open_cache(cache_path)
    values = []
    for shard in cache.manifest.shards:
        t = pq.read_table(cache.path / shard.name, columns=["example_id", "teacher_nll"]).to_pylist()
        values += [r["teacher_nll"] for r in t if not is_heldout(r["example_id"]) and not math.isnan(r["teacher_nll"])]
    return sorted(values)


def test_the_stream_admits_only_the_easiest_fraction_at_each_step(tiny_cache):
    cache = open_cache(tiny_cache)
    is_heldout = holdout_fraction_filter(0.05)
    by_hand = _difficulties_by_hand(tiny_cache, 0.05)
    assert training_difficulties(cache, "teacher_nll", is_heldout).tolist() == by_hand
    cfg = CurriculumConfig(by="teacher_nll", pacing="linear", start=0.25, full_at=0.5)
    steps = 40
    cur = Curriculum(cfg, np.array(by_hand), steps)
    step = 0
    seen: list[tuple[int, float]] = []
    stream = cache.stream(shuffle=True, seed=0, epochs=None, columns=["example_id", "teacher_nll"], keep=lambda i: not is_heldout(i))
    for ex in cur.filter(iter(stream), lambda: step):
        seen.append((step, ex["teacher_nll"]))
        if len(seen) % 4 == 0:  # a "batch" of 4 per step
            step += 1
        if step == steps:
            break
    n = len(by_hand)
    for s, v in seen:
        admitted = by_hand[max(1, math.ceil(competence(cfg, s, steps) * n)) - 1]  # the ceil(c n)-th easiest
        assert v <= admitted, (s, v, admitted)
    early = [v for s, v in seen if s < 5]
    late = [v for s, v in seen if s >= steps // 2]
    assert np.mean(early) < np.mean(late) and max(late) > max(early)  # harder examples arrive later


def test_hard_first_admits_the_hardest(tiny_cache):
    cache = open_cache(tiny_cache)
    values = training_difficulties(cache, "teacher_nll", holdout_fraction_filter(0.05))
    cur = Curriculum(CurriculumConfig(by="teacher_nll", order="hard_first", start=0.2, full_at=1.0), values, 10)
    assert cur.admits(float(values[-1]), 0) and not cur.admits(float(values[0]), 0)
    assert cur.admits(float(values[0]), 10)


def _train_nll(out) -> list[float]:
    return [r["teacher_nll"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "teacher_nll" in r]


def test_a_run_trains_on_easy_examples_first(tiny_cache, tmp_path):
    """The teacher NLL of the tokens each step trained on (logged per step) starts low and rises under
    easy_first, starts high under hard_first, and is flat-ish without a curriculum."""
    common = dict(steps=24, batch_size=4, eval_fraction=0.05)
    cur = {"by": "teacher_nll", "pacing": "linear", "start": 0.2, "full_at": 0.75}
    runs = {"easy": CurriculumConfig(**cur), "hard": CurriculumConfig(**cur, order="hard_first"), "plain": CurriculumConfig()}
    for name, curriculum in runs.items():
        train(make_cfg(tiny_cache, tmp_path / name, curriculum=curriculum, **common), progress=False)
    easy, hard, plain = (_train_nll(tmp_path / name) for name in runs)
    first = slice(0, 6)
    assert np.mean(easy[first]) < np.mean(plain[first]) < np.mean(hard[first])
    assert np.mean(easy[first]) < np.mean(easy[-6:])
    rows = [json.loads(x) for x in (tmp_path / "easy" / "metrics.jsonl").read_text().splitlines()]
    comp = [r["curriculum_competence"] for r in rows if "curriculum_competence" in r]
    assert comp[0] == pytest.approx(0.2) and comp[-1] == 1.0


def test_resume_inside_the_pacing_is_exact(tiny_cache, tmp_path):
    cur = CurriculumConfig(by="teacher_nll", pacing="root", start=0.3, full_at=0.8)
    cfg = dict(steps=8, save_every=4, keep_checkpoints=2, batch_size=4, curriculum=cur)
    whole = tmp_path / "whole"
    train(make_cfg(tiny_cache, whole, **cfg), progress=False)
    out = tmp_path / "run"
    train(make_cfg(tiny_cache, out, **cfg), progress=False)
    # the state a crash after step 4's checkpoint leaves: resume from step 4, half-way through the pacing
    shutil.rmtree(out / "checkpoints" / "step-0000008")
    (out / "checkpoints" / "latest").write_text("step-0000004")
    shutil.rmtree(out / "final")
    (out / "final_metrics.json").unlink()
    train(make_cfg(tiny_cache, out, **cfg), progress=False)
    assert_same_weights(final_weights(out), final_weights(whole))


def test_a_curriculum_given_as_a_mapping_is_typed_and_checked():
    from kdcache.errors import ConfigError
    from kdcache.train.config import TrainConfig

    assert TrainConfig(curriculum={"by": "teacher_nll", "start": 0.5}).curriculum == CurriculumConfig(by="teacher_nll", start=0.5)
    assert TrainConfig(student={"hidden_size": 64}).student.hidden_size == 64  # any section, not only this one
    with pytest.raises(ConfigError, match=r"curriculum.strat \(did you mean curriculum.start\?\)"):
        TrainConfig(curriculum={"by": "teacher_nll", "strat": 0.5})
    with pytest.raises(ConfigError, match=r"curriculum.start must be in \(0, 1\], got 0"):
        TrainConfig(curriculum={"by": "teacher_nll", "start": 0})
