"""Sequence packing (kdcache.train.packing): every example of a packed row gets the logits it gets alone, no target
crosses an example boundary, a packed batch's loss is the padded batch's, and a packed run follows the padded run's
loss curve; what cannot be packed is refused in one line.

Real tiny models: the conftest tokenizer and top-8 cache, Llama students (rotary positions, sdpa and eager attention)
and a GPT-2 student, whose learned absolute positions make a position that does not restart at 0 show in the logits.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.cache import open_cache
from kdcache.errors import ConfigError
from kdcache.train import train
from kdcache.train.config import StageConfig
from kdcache.train import packing
from kdcache.train.data import BASE_COLUMNS, EVAL_SIGNALS, collate
from kdcache.train.losses import LossSettings, get_loss
from kdcache.train.objective import Objective, forward

from conftest import WORDS
from test_train import STUDENT, make_cfg, train_rows

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 4 + len({*WORDS, *"abcdefghijklmnopqrstuvwxyz0123456789.,:;()'\"-_"})  # the conftest tokenizer's size
TOL = 1e-4  # logits and one batch's loss
CURVE_TOL = 1e-5  # a run's logged metrics: packed and padded sum in another order only (~1e-7 apart here)


def llama(attn: str = "sdpa", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=256, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def gpt2(attn: str = "sdpa", seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=256, bos_token_id=0,
                                      eos_token_id=0, attn_implementation=attn)).eval()


MODELS = {"llama-sdpa": lambda: llama("sdpa"), "llama-eager": lambda: llama("eager"), "gpt2-sdpa": lambda: gpt2("sdpa")}


@pytest.fixture(scope="module")
def models(tiny_cache):
    assert open_cache(tiny_cache).manifest.vocab_size == VOCAB
    built = {name: make() for name, make in MODELS.items()}
    for m in built.values():
        packing.enable(m)
    return built


@pytest.fixture(scope="module")
def cache_examples(tiny_cache):
    cache = open_cache(tiny_cache)
    return list(cache.stream(columns=[c for c in (*BASE_COLUMNS, *EVAL_SIGNALS) if c in cache.columns]))[:24]


def synthetic(lengths: list[int], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(4, VOCAB, n), "loss_mask": rng.random(n - 1) < 0.8} for n in lengths]


def placement(examples: list[dict], max_length: int | None = None):
    """(order, rows, offsets): where pack puts each example, from the same plan."""
    lens = np.array([len(ex["input_ids"]) for ex in examples])
    rows, offsets = packing.plan_rows(lens, int(max_length or lens.max()))
    order = np.lexsort((offsets, rows))
    return order, rows, offsets, lens


@torch.no_grad()
def alone_logits(model, ex: dict) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(ex["input_ids"], dtype=np.int64))[None]
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]


@torch.no_grad()
def check_packed_equals_alone(model, examples: list[dict], max_length: int | None = None) -> None:
    """The invariants on one micro-batch: logits, positions, targets and their order, boundaries."""
    b = packing.pack(examples, pad_id=1, max_length=max_length)
    order, rows, offsets, lens = placement(examples, max_length)
    seg = b.attention_mask
    assert b.input_ids.shape[0] == rows.max() + 1 <= len(examples) and b.input_ids.shape[1] == (max_length or lens.max())
    assert sorted((seg > 0).sum(1).tolist()) == sorted(np.bincount(rows, weights=lens).astype(int).tolist())
    pos = packing.position_ids(seg)
    logits = model(input_ids=b.input_ids, attention_mask=seg).logits
    for i in order:
        r, o, n = rows[i], offsets[i], lens[i]
        np.testing.assert_array_equal(b.input_ids[r, o : o + n].numpy(), examples[i]["input_ids"])
        assert pos[r, o : o + n].tolist() == list(range(n)), "positions restart at 0 for every example"
        assert len(set(seg[r, o : o + n].tolist())) == 1 and seg[r, o] > 0
        diff = (logits[r, o : o + n] - alone_logits(model, examples[i])).abs().max().item()
        assert diff < TOL, f"example {i} (row {r}, offset {o}, {n} tokens) packed differs from alone by {diff:.3g}"
        np.testing.assert_array_equal(b.select[r, o : o + n - 1].numpy(), examples[i]["loss_mask"])
    # no target crosses a boundary: a selected position and the token it predicts are in the same example
    r, c = b.select.nonzero(as_tuple=True)
    assert (seg[r, c] == seg[r, c + 1]).all() and (seg[r, c] > 0).all()
    # the targets, flattened row-major over the packed rows, are the examples' own targets in row order
    want = np.concatenate([np.asarray(examples[i]["input_ids"])[1:][examples[i]["loss_mask"]] for i in order])
    np.testing.assert_array_equal(b.targets.labels.numpy(), want)
    np.testing.assert_array_equal(b.input_ids[:, 1:][b.select].numpy(), want)
    assert b.num_tokens == sum(int(ex["loss_mask"].sum()) for ex in examples)


def test_plan_rows_first_fit_longest_first():
    lens = np.array([3, 8, 5, 2, 6, 1])
    rows, offsets = packing.plan_rows(lens, 8)
    # longest first: 8 fills row 0; 6 opens row 1, 5 row 2; 3 fits after the 5, 2 after the 6; 1 fits nowhere: row 3
    assert rows.tolist() == [2, 0, 2, 1, 1, 3] and offsets.tolist() == [5, 0, 0, 6, 0, 0]
    for r in set(rows.tolist()):
        spans = sorted((offsets[i], offsets[i] + lens[i]) for i in np.flatnonzero(rows == r))
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= 8
    assert (packing.plan_rows(lens, 8)[0] == rows).all()  # deterministic
    with pytest.raises(ValueError, match="does not fit"):
        packing.plan_rows(np.array([9]), 8)


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_logits_equal_each_example_alone(models, cache_examples, name):
    for start in range(0, len(cache_examples), 8):
        check_packed_equals_alone(models[name], cache_examples[start : start + 8])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12), extra=st.integers(0, 8), seed=st.integers(0, 2**16),
       name=st.sampled_from(list(MODELS)))
def test_property_packed_logits_equal_alone_and_no_target_crosses(models, lengths, extra, seed, name):
    check_packed_equals_alone(models[name], synthetic(lengths, seed), max_length=max(lengths) + extra)


def test_rotary_embedding_reads_positions_that_restart(models, cache_examples):
    """What the student's rotary embedding is given (the hook's work), not only what position_ids computes."""
    model = models["llama-sdpa"]
    seen = []
    handle = model.model.rotary_emb.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)
    try:
        b = packing.pack(cache_examples[:8])
        with torch.no_grad():
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    finally:
        handle.remove()
    given = seen[0].expand_as(b.attention_mask)
    assert torch.equal(given, packing.position_ids(b.attention_mask))
    assert ((given[:, 1:] == 0) & (b.attention_mask[:, 1:] > 1)).any()  # a second example of a row starts again at 0


def test_block_causal_mask_as_a_4d_mask_gives_the_same_logits(models, cache_examples):
    """The explicit mask (sdpa reads it as is) agrees with what transformers builds from the positions."""
    model = llama("sdpa")
    b = packing.pack(cache_examples[:8])
    with torch.no_grad():
        hooked = models["llama-sdpa"](input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        explicit = model(input_ids=b.input_ids, attention_mask=packing.block_causal_mask(b.attention_mask),
                         position_ids=packing.position_ids(b.attention_mask)).logits
    real = b.attention_mask > 0
    assert (hooked - explicit)[real].abs().max() < TOL


def test_padded_batches_read_as_before_through_the_hook(models, cache_examples):
    b = collate(cache_examples[:8], pad_id=1)
    plain = llama("sdpa")
    with torch.no_grad():
        hooked = models["llama-sdpa"](input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        ref = plain(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert (hooked - ref)[b.attention_mask.bool()].abs().max() < TOL


@pytest.mark.parametrize("loss", ["kd", "ce", "jsd"])
def test_packed_loss_equals_padded_loss(models, cache_examples, loss):
    model = models["llama-sdpa"]
    spec = get_loss(loss)
    objective = Objective(loss, spec, None, [], [], 0, 1)
    ls = LossSettings(temperature=2.0, alpha=0.5)
    for start in range(0, 24, 8):
        ex = cache_examples[start : start + 8]
        padded, packed = collate(ex, pad_id=1), packing.pack(ex, pad_id=1)
        assert packed.input_ids.numel() < padded.input_ids.numel()
        with torch.no_grad():
            a, pa = forward(model, padded, objective, ls, contextlib.nullcontext)
            b, pb = forward(model, packed, objective, ls, contextlib.nullcontext)
        assert packed.num_tokens == padded.num_tokens and packed.teacher_nll_sum == pytest.approx(padded.teacher_nll_sum)
        assert abs(a.item() - b.item()) <= TOL * max(1.0, abs(a.item())), (a.item(), b.item())
        for k in pa:
            assert abs(pa[k].item() - pb[k].item()) <= TOL * max(1.0, abs(pa[k].item()))


def test_packed_positional_signals_sit_at_their_tokens(tiny_teacher, text_jsonl, tmp_path):
    """Hidden states (a stored subset of positions) follow their tokens into the packed rows."""
    from kdcache.pipeline.config import DataConfig, GenerateConfig
    from kdcache.pipeline.generate import generate

    cache = tmp_path / "cache"
    generate(GenerateConfig(teacher=str(tiny_teacher), out=str(cache), top_k=8, hidden_layers=[2], hidden_positions="stride:3",
                            data=DataConfig(source=str(text_jsonl), max_length=64, max_rows=12)), progress=False)
    examples = list(open_cache(cache).stream(columns=["example_id", "input_ids", "loss_mask", "hidden_2", "hidden_positions"]))[:8]
    b = packing.pack(examples)
    order, rows, offsets, lens = placement(examples)
    mask = b.signals["hidden_mask"]
    assert int(mask.sum()) == sum(len(ex["hidden_positions"]) for ex in examples)
    for i in order:
        at = offsets[i] + np.asarray(examples[i]["hidden_positions"])
        assert len(at) and mask[rows[i], at].all()
        np.testing.assert_array_equal(b.signals["hidden_2"][rows[i], at].numpy(), examples[i]["hidden_2"])


def _curves(cache, tmp_path, monkeypatch, steps=4, **kw):
    """Metrics of a padded and a packed run of the same config; the packed one must have packed something."""
    shapes = []
    real_pack = packing.pack

    def recording_pack(*args, **kwargs):
        b = real_pack(*args, **kwargs)
        shapes.append(tuple(b.input_ids.shape))
        return b

    monkeypatch.setattr(packing, "pack", recording_pack)
    out = {}
    for packed in (False, True):
        cfg = make_cfg(cache, tmp_path / f"run-{packed}", steps=steps, eval_fraction=0.1, eval_every=0, packing=packed, **kw)
        out[packed] = (train(cfg, progress=False), train_rows(tmp_path / f"run-{packed}"))
        assert bool(shapes) == packed
    assert any(rows < kw.get("batch_size", 8) for rows, _ in shapes), shapes  # fewer rows than examples
    return out


def _assert_same_curve(runs) -> None:
    (f_pad, pad), (f_pack, pack) = runs[False], runs[True]
    assert len(pad) == len(pack)
    for a, b in zip(pad, pack):
        for k in a:
            if k != "tokens_per_s":
                assert b[k] == pytest.approx(a[k], rel=CURVE_TOL, abs=CURVE_TOL / 10), (k, a, b)
    assert f_pack["eval_ce"] == pytest.approx(f_pad["eval_ce"], rel=CURVE_TOL)


def test_a_packed_run_follows_the_padded_runs_loss_curve(tiny_cache, tmp_path, monkeypatch):
    _assert_same_curve(_curves(tiny_cache, tmp_path, monkeypatch, steps=5, alpha=0.5, grad_accum=2))


# ema with hard labels mixed in: at step 0 the EMA teacher is the student, and at alpha 1 the gradient is then float noise
# that AdamW scales into full-size steps, so any two runs that sum in another order (packed or not) part at once
@pytest.mark.parametrize("kw", [dict(pseudo_teacher="ema", alpha=0.5), dict(pseudo_teacher="peers", grad_accum=1),
                                dict(terms={"exits": {"layers": [1]}}, student=dict(STUDENT, num_layers=2))],
                         ids=["ema", "peers", "exits"])
def test_packed_runs_with_pseudo_teachers_and_terms_follow_the_padded_ones(tiny_cache, tmp_path, monkeypatch, kw):
    _assert_same_curve(_curves(tiny_cache, tmp_path, monkeypatch, steps=3, **kw))


def test_a_packed_run_with_the_dropout_pseudo_teacher_trains(tiny_cache, tmp_path):
    """Its dropout masks are drawn per tensor shape, so no curve to compare: it runs packed and learns something finite."""
    train(make_cfg(tiny_cache, tmp_path / "run", steps=2, packing=True, pseudo_teacher="dropout",
                   student=dict(STUDENT, attention_dropout=0.1)), progress=False)
    assert all(np.isfinite(r["loss"]) for r in train_rows(tmp_path / "run"))


def test_a_packed_run_with_the_hidden_term_follows_the_padded_one(tiny_teacher, text_jsonl, tmp_path, monkeypatch):
    from kdcache.pipeline.config import DataConfig, GenerateConfig
    from kdcache.pipeline.generate import generate

    cache = tmp_path / "cache"
    generate(GenerateConfig(teacher=str(tiny_teacher), out=str(cache), top_k=8, hidden_layers=[1], hidden_codec="fp32",
                            data=DataConfig(source=str(text_jsonl), max_length=64, max_rows=40)), progress=False)
    _assert_same_curve(_curves(cache, tmp_path, monkeypatch, steps=3, terms={"hidden": 0.5}, student=dict(STUDENT, num_layers=2)))


@pytest.mark.parametrize("kw, message", [
    (dict(terms={"attention": 1.0}), r"packing=true cannot be used with terms\.attention: .*; use packing=false or drop terms\.attention"),
    (dict(stages=[StageConfig(steps=1), StageConfig(terms={"attention": 1.0})]), r"cannot be used with terms\.attention"),
    (dict(pseudo_teacher="augment"), r"packing=true cannot be used with pseudo_teacher augment: .*; use packing=false or another pseudo_teacher"),
])
def test_what_cannot_be_packed_is_refused_in_one_line_before_the_run_dir(tiny_cache, tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message) as exc:
        train(make_cfg(tiny_cache, tmp_path / "run", steps=2, packing=True, **kw), progress=False)
    assert "\n" not in str(exc.value) and not (tmp_path / "run").exists()


def test_a_student_that_lets_packed_examples_attend_to_each_other_is_refused(monkeypatch):
    """A decoder that ignores the hook's positions (here: a hook that changes nothing) fails the start-up check."""
    monkeypatch.setattr(packing, "_packed_call", lambda module, args, kwargs: None)
    with pytest.raises(ConfigError, match=r"does not keep packed examples apart .*; use packing=false"):
        packing.enable(llama("sdpa"))


def test_the_cli_takes_packing(tiny_cache, tmp_path):
    from click.testing import CliRunner

    from kdcache.cli.main import main

    args = ["train", "--cache", str(tiny_cache), "--steps", "2", "--device", "cpu", "--set", "student.num_layers=1",
            "--set", "student.hidden_size=32", "--set", "student.num_heads=2", "--set", "student.num_kv_heads=1", "--set", "eval_every=0"]
    ok = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run"), "--set", "packing=true"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "bad"), "--set", "packing=true", "--set", "terms.attention=1"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "packing=false" in bad.output, bad.output
