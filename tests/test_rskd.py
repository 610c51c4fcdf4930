"""Sampled sparse logits (RS-KD): the estimator is unbiased, the cache round-trips, the trainer uses it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache.cache import open_cache
from kdcache.errors import ConfigError
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.generate import generate
from kdcache.pipeline.teachers.sampling import sample_sparse, sequence_uniforms
from kdcache.train import StudentConfig, TrainConfig, train
from kdcache.train.data import _sampled_targets, collate
from kdcache.train.losses import LossSettings, Targets, get_loss


def _teacher_student(P=5, V=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(2.5 * torch.randn(P, V, generator=g, dtype=torch.float64), -1).float()
    z = torch.randn(P, V, generator=g)
    return logp, z


def _rskd_grad(logp, z, reps: int, draws: int, temperature: float, seed: int = 0) -> torch.Tensor:
    """Mean RS-KD gradient over ``reps`` independent sample sets (all drawn in one vectorised call)."""
    P, V = logp.shape
    rep_logp = logp.repeat(reps, 1)
    u = torch.rand(P * reps, draws, generator=torch.Generator().manual_seed(seed))
    ids, w, sizes = sample_sparse(rep_logp, u, temperature)
    ex = {"sampled_ids": ids.numpy(), "sampled_weights": w.numpy(), "sampled_sizes": sizes.numpy()}
    s_ids, s_w = _sampled_targets([ex], [np.ones(P * reps, dtype=bool)])
    zz = z.repeat(reps, 1).requires_grad_(True)
    loss, _ = get_loss("rskd").fn(zz, Targets(torch.zeros(P * reps, dtype=torch.long), sampled_ids=s_ids, sampled_weights=s_w), LossSettings(alpha=1.0))
    loss.backward()
    return zz.grad.reshape(reps, P, V).mean(0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_gradient_is_unbiased_and_topk_is_not(temperature):
    logp, z = _teacher_student()
    full = torch.softmax(z, -1) - logp.exp()  # gradient of KL(teacher || student) w.r.t. student logits
    est = _rskd_grad(logp, z, reps=20000, draws=12, temperature=temperature)
    err = (est - full).abs().max().item()
    # Monte Carlo error ~ 1/sqrt(reps * draws); the bias of a biased estimator would not shrink.
    assert err < 0.01, err
    # Doubling the repetitions shrinks the error (no floor from a bias).
    est_small = _rskd_grad(logp, z, reps=500, draws=12, temperature=temperature, seed=1)
    assert (est_small - full).abs().max().item() > err
    # Top-k (renormalised, or with a tail bucket): a fixed, deterministic gap to the full gradient.
    vals, ids = logp.topk(4, -1)
    tail = torch.log(-torch.expm1(torch.logsumexp(vals, -1)))
    for mode in ("renormalize", "bucket"):
        zz = z.clone().requires_grad_(True)
        loss, _ = get_loss("fkl").fn(zz, Targets(torch.zeros(5, dtype=torch.long), ids, vals, tail), LossSettings(alpha=1.0, tail=mode))
        loss.backward()
        assert (zz.grad - full).abs().max().item() > 5 * err, mode


def test_weights_sum_to_one_at_temperature_one_and_ids_are_distinct():
    logp, _ = _teacher_student(P=64)
    u = sequence_uniforms([1, 2], [30, 34], 50)
    ids, w, sizes = sample_sparse(logp, u, 1.0)
    assert int(sizes.sum()) == len(ids) and (sizes >= 1).all() and (sizes <= 50).all()
    row = torch.repeat_interleave(torch.arange(64), sizes)
    sums = torch.zeros(64, dtype=torch.float64).index_add_(0, row, w.double())
    assert torch.allclose(sums, torch.ones(64, dtype=torch.float64), atol=1e-6)
    keys = row * 1000 + ids
    assert len(torch.unique(keys)) == len(keys)
    # Same seeds, same draws, whatever the batch composition.
    again = sample_sparse(logp[30:], sequence_uniforms([2], [34], 50), 1.0)
    start = int(sizes[:30].sum())
    assert torch.equal(again[0], ids[start:])


def test_generate_writes_sampled_only_cache_and_train_uses_it(tiny_teacher, text_jsonl, tmp_path):
    cfg = GenerateConfig(teacher=str(tiny_teacher), out=str(tmp_path / "c"), top_k=0, sampled_tokens=16,
                         data=DataConfig(source=str(text_jsonl), max_length=48, max_rows=32))
    m = generate(cfg, progress=False)
    cache = open_cache(tmp_path / "c")
    assert "topk_ids" not in cache.columns and {"sampled_ids", "sampled_weights", "sampled_sizes"} <= set(cache.columns)
    assert m.signals["sampled"]["draws"] == 16 and m.settings["scoring"]["sampled_tokens"] == 16
    for ex in cache.stream():
        n = len(ex["input_ids"]) - 1
        assert len(ex["sampled_sizes"]) == n and int(ex["sampled_sizes"].sum()) == len(ex["sampled_ids"])
        pos = np.repeat(np.arange(n), ex["sampled_sizes"].astype(np.int64))
        np.testing.assert_allclose(np.bincount(pos, weights=ex["sampled_weights"].astype(np.float64), minlength=n), 1.0, atol=2e-3)
    # Deterministic: a second cache from the same settings holds the same draws.
    generate(GenerateConfig(**{**cfg.__dict__, "out": str(tmp_path / "c2")}), progress=False)
    a = [ex["sampled_ids"] for ex in open_cache(tmp_path / "c").stream()]
    b = [ex["sampled_ids"] for ex in open_cache(tmp_path / "c2").stream()]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # The batch keeps exactly the loss-mask positions' draws.
    exs = list(open_cache(tmp_path / "c").stream())[:3]
    batch = collate(exs)
    assert batch.targets.sampled_ids.shape[0] == batch.num_tokens
    assert torch.allclose(batch.targets.sampled_weights.sum(-1), torch.ones(batch.num_tokens), atol=2e-3)

    run = TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "run"), loss="rskd", steps=4, batch_size=4, eval_every=0, save_every=0,
                      student=StudentConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64))
    metrics = train(run, progress=False)
    assert math.isfinite(metrics["eval_ppl"])
    with pytest.raises(ConfigError, match="needs the cache signal topk_ids.*--top-k K"):
        train(TrainConfig(**{**run.__dict__, "loss": "kd", "out": str(tmp_path / "run2")}), progress=False)


def test_rskd_refuses_other_temperatures_and_caches_without_samples(tiny_cache, tmp_path):
    with pytest.raises(ConfigError, match="needs the cache signal sampled_ids.*--sampled-tokens N"):
        train(TrainConfig(cache=str(tiny_cache), out=str(tmp_path / "r"), loss="rskd", steps=1), progress=False)
    t = Targets(torch.zeros(2, dtype=torch.long), sampled_ids=torch.zeros(2, 1, dtype=torch.long), sampled_weights=torch.ones(2, 1))
    with pytest.raises(ConfigError, match="temperature-1"):
        get_loss("rskd").fn(torch.zeros(2, 5), t, LossSettings(temperature=2.0))
