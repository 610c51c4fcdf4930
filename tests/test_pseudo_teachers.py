"""Pseudo-teachers built from the student: cache-shaped targets, the EMA update and its exact resume,
augmentation that corrupts only the student's input, and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from test_train import assert_same_weights, final_weights, make_cfg, train_rows, without_timing

from kdcache.cache import open_cache
from kdcache.errors import ConfigError
from kdcache.train import train
from kdcache.train.data import EVAL_SIGNALS, batches, train_columns
from kdcache.train.pseudo_teachers import AugmentTeacher, EMATeacher, topk_targets
from kdcache.train.student import build_student


def test_topk_targets_match_a_cache_row():
    logits = torch.randn(6, 20, dtype=torch.float64)
    t = topk_targets(logits, torch.zeros(6, dtype=torch.long), 5)
    logp = torch.log_softmax(logits, -1)
    vals, ids = logp.topk(5, -1)
    assert torch.equal(t.topk_ids, ids) and torch.allclose(t.topk_logprobs, vals.float())
    assert torch.allclose(t.tail_logprob.exp() + t.topk_logprobs.exp().sum(-1), torch.ones(6), atol=1e-6)
    full = topk_targets(logits, torch.zeros(6, dtype=torch.long), 20)
    assert torch.isneginf(full.tail_logprob).all()


def test_ema_update_and_augmentation(tiny_cache):
    cfg = make_cfg(tiny_cache, "unused", pseudo_teacher="ema", pseudo_teachers={"ema": {"decay": 0.9}, "augment": {"prob": 0.3}})
    model, _ = build_student(cfg.student, open_cache(tiny_cache), seed=0)
    ema = EMATeacher(cfg, model)
    before = [p.detach().clone() for p in ema.ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.after_step(model)
    for e, b, p in zip(ema.ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p)
    batch = next(batches(open_cache(tiny_cache).stream(columns=train_columns(open_cache(tiny_cache), EVAL_SIGNALS)), 8))
    aug = AugmentTeacher(cfg, model)
    a, b = aug.student_batch(batch, step=3), aug.student_batch(batch, step=3)
    assert torch.equal(a.input_ids, b.input_ids)  # drawn from (seed, step): a resumed run draws the same
    changed = (a.input_ids != batch.input_ids) & batch.attention_mask.bool()
    assert 0.1 < changed.sum().item() / batch.attention_mask.sum().item() < 0.4
    assert not changed[:, 0].any() and torch.equal(a.targets.labels, batch.targets.labels)
    assert torch.equal(a.input_ids[~batch.attention_mask.bool()], batch.input_ids[~batch.attention_mask.bool()])


@pytest.mark.parametrize("kind", ["ema", "augment"])
def test_pseudo_teacher_trains_and_resumes_exactly(kind, tiny_cache, tmp_path):
    common = dict(steps=6, save_every=3, loss="jsd", alpha=0.5, min_lr_ratio=1.0, warmup_steps=4, pseudo_teacher=kind,
                  pseudo_teachers={"ema": {"decay": 0.5}})
    a, b = tmp_path / "a", tmp_path / "b"
    final_a = train(make_cfg(tiny_cache, a, **common), progress=False)
    train(make_cfg(tiny_cache, b, **{**common, "steps": 3}), progress=False)
    final_b = train(make_cfg(tiny_cache, b, **common, resume=True), progress=False)
    assert_same_weights(final_weights(a), final_weights(b))
    assert [without_timing(r) for r in train_rows(a)[3:]] == [without_timing(r) for r in train_rows(b)[3:]]
    assert final_a == final_b and math.isfinite(final_a["eval_ppl"])
    if kind == "ema":  # the average travels with the checkpoint
        state = load_file(str(a / "checkpoints" / "step-0000006" / "trainer_state.safetensors"))
        assert any(k.startswith("extra.ema.") for k in state)
    # The pseudo-teacher's targets differ from the student's predictions (for ema from step 2 on: at step 1
    # the average still equals the student).
    assert all(r["jsd"] > 0 for r in train_rows(a)[1 if kind == "ema" else 0 :])


def test_pseudo_teacher_needs_a_divergence_loss(tiny_cache, tmp_path):
    with pytest.raises(ConfigError, match="pair it with a divergence loss"):
        train(make_cfg(tiny_cache, tmp_path / "r", pseudo_teacher="ema", loss="ce"), progress=False)
    with pytest.raises(ConfigError, match="pseudo_teachers.ema.decay must be in"):
        train(make_cfg(tiny_cache, tmp_path / "r", pseudo_teacher="ema", pseudo_teachers={"ema": {"decay": 1.5}}), progress=False)
    assert not (tmp_path / "r").exists()


def test_peers_train_together_from_one_read_and_resume_exactly(tiny_cache, tmp_path, monkeypatch):
    from kdcache.cache.reader import Cache

    reads = []
    original = Cache.read_block
    monkeypatch.setattr(Cache, "read_block", lambda self, g, columns=None: reads.append(g) or original(self, g, columns))
    common = dict(steps=6, save_every=3, loss="kd", alpha=0.5, min_lr_ratio=1.0, warmup_steps=4, pseudo_teacher="peers",
                  pseudo_teachers={"peers": {"count": 3}})
    a, b = tmp_path / "a", tmp_path / "b"
    train(make_cfg(tiny_cache, tmp_path / "solo", steps=6, loss="kd"), progress=False)
    single_reads, reads[:] = list(reads), []
    final_a = train(make_cfg(tiny_cache, a, **common), progress=False)
    assert reads == single_reads  # three students, the same cache reads as one
    train(make_cfg(tiny_cache, b, **{**common, "steps": 3}), progress=False)
    final_b = train(make_cfg(tiny_cache, b, **common, resume=True), progress=False)
    assert_same_weights(final_weights(a), final_weights(b))
    sa = load_file(str(a / "checkpoints" / "step-0000006" / "trainer_state.safetensors"))
    sb = load_file(str(b / "checkpoints" / "step-0000006" / "trainer_state.safetensors"))
    peers = [k for k in sa if k.startswith("extra.peer1.w.")]
    assert peers and all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("extra.peer"))
    assert final_a == final_b
    # Peers start from other weights: peer 1 is not a copy of the student.
    key = next(k for k in peers if "layers.0." in k)
    assert not torch.equal(sa[key], final_weights(a)[key.split(".w.", 1)[1]])
    # Every peer is saved beside the run's student and evaluated with it.
    for name in ("peer1", "peer2"):
        saved = load_file(str(a / "final" / "peers" / name / "model.safetensors"))
        ours = {k.split(".w.", 1)[1]: v for k, v in sa.items() if k.startswith(f"extra.{name}.w.")}
        assert ours.keys() >= saved.keys() and all(torch.equal(saved[k], ours[k]) for k in saved)
        assert math.isfinite(final_a["peers"][name]["eval_ppl"]) and final_a["peers"][name]["eval_ppl"] != final_a["eval_ppl"]
    assert not (a / "final" / "peers" / "peer3").exists()


def test_dropout_teacher_needs_dropout_and_resumes_exactly(tiny_cache, tmp_path):
    from test_train import STUDENT

    from kdcache.train import StudentConfig

    with pytest.raises(ConfigError, match="student.attention_dropout=0.1"):
        train(make_cfg(tiny_cache, tmp_path / "x", pseudo_teacher="dropout", loss="kd"), progress=False)
    student = StudentConfig(**{**STUDENT, "attention_dropout": 0.3})
    common = dict(steps=4, save_every=2, loss="kd", alpha=0.5, min_lr_ratio=1.0, warmup_steps=3, pseudo_teacher="dropout", student=student)
    a, b = tmp_path / "a", tmp_path / "b"
    final_a = train(make_cfg(tiny_cache, a, **common), progress=False)
    train(make_cfg(tiny_cache, b, **{**common, "steps": 2}), progress=False)
    final_b = train(make_cfg(tiny_cache, b, **common, resume=True), progress=False)
    assert_same_weights(final_weights(a), final_weights(b))  # asserts inside; returns None
    assert final_a == final_b
    # Two dropout masks disagree: the KD term is not zero even at step 1, when teacher and student share weights.
    assert all(r["kd"] > 0 for r in train_rows(a))


def test_peers_can_mix_in_the_cached_teacher(tiny_cache, tmp_path):
    from kdcache.train.pseudo_teachers import PeerTeacher

    cfg = make_cfg(tiny_cache, tmp_path / "r", pseudo_teacher="peers", pseudo_teachers={"peers": {"teacher_weight": 1.0}}, loss="kd")
    cache = open_cache(tiny_cache)
    model, _ = build_student(cfg.student, cache, seed=0)
    peers = PeerTeacher(cfg, model)
    batch = next(batches(cache.stream(columns=train_columns(cache, EVAL_SIGNALS)), 4))
    t = peers.targets(model, batch, lambda: torch.autocast("cpu", enabled=False))
    k = batch.targets.topk_ids.shape[1]
    # weight 1: the target is the cached teacher (its top-k first, then the evenly spread tail)
    assert torch.equal(t.topk_ids[:, :k].sort(-1).values, batch.targets.topk_ids.sort(-1).values)
    assert torch.allclose(t.topk_logprobs[:, :k], batch.targets.topk_logprobs.float(), atol=1e-3)  # fp16 cache, renormalised
    final = train(make_cfg(tiny_cache, tmp_path / "mix", steps=3, pseudo_teacher="peers",
                                   pseudo_teachers={"peers": {"teacher_weight": 0.5}}, loss="jsd"), progress=False)
    assert math.isfinite(final["eval_ppl"])
