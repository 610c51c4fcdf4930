"""Loss terms beyond the logits: feature KD, layer-wise exits, stage-wise training and the term interface.

Each mechanism is shown against an independent measurement (linear CKA between the student's and the
teacher's hidden states, computed here from a plain transformers forward and the Parquet files; an exit's
perplexity as a standalone model), and each fails when the mechanism is switched off.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from kdcache.cache import holdout_fraction_filter, open_cache
from kdcache.errors import ConfigError
from kdcache.train import train
from kdcache.train.objective import Needs, taps
from test_train import assert_same_weights, final_weights, make_cfg, train_rows

STUDENT2 = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def hidden_cache(tiny_teacher, text_jsonl, tmp_path_factory) -> Path:
    """The tiny teacher's top-8 and hidden states of layers 1 and 2 (the last, after the final norm)."""
    from kdcache.pipeline.config import DataConfig, GenerateConfig
    from kdcache.pipeline.generate import generate

    out = tmp_path_factory.mktemp("caches") / "hidden"
    generate(GenerateConfig(teacher=str(tiny_teacher), out=str(out), top_k=8, hidden_layers=[1, 2], hidden_codec="fp32",
                            data=DataConfig(source=str(text_jsonl), max_length=64)), progress=False)
    return out


def _cfg(cache, out, **kw):
    base = dict(student=dict(STUDENT2), alpha=0.5, steps=40, batch_size=8, lr=1e-2, eval_fraction=0.2)
    base.update(kw)
    return make_cfg(cache, out, **base)


def _linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) between two sets of row vectors: projection-free, scale-free."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _heldout_cka(cache_path: Path, student_dir: Path, student_layer: int, teacher_layer: int) -> float:
    """CKA on the held-out rows: the teacher's states straight from Parquet, the student's from output_hidden_states."""
    from transformers import AutoModelForCausalLM

    is_heldout = holdout_fraction_filter(0.2)
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    width = json.loads((cache_path / "_manifest.json").read_text())["signals"]["hidden"]["size"]
    s_rows, t_rows = [], []
    for part in sorted(cache_path.glob("part-*.parquet")):
        for r in pq.read_table(part, columns=["example_id", "input_ids", f"hidden_{teacher_layer}"]).to_pylist():
            if not is_heldout(r["example_id"]):
                continue
            with torch.no_grad():
                hs = model(torch.tensor([r["input_ids"]]), output_hidden_states=True).hidden_states[student_layer][0]
            s_rows.append(hs.numpy())
            t_rows.append(np.asarray(r[f"hidden_{teacher_layer}"], dtype=np.float64).reshape(-1, width))
    return _linear_cka(np.concatenate(s_rows).astype(np.float64), np.concatenate(t_rows))


def test_the_hidden_term_makes_the_students_states_like_the_teachers(hidden_cache, tmp_path, one_thread):
    terms = {"hidden": {"weight": 5.0, "metric": "cosine", "mapping": [[1, 1]]}}
    on = train(_cfg(hidden_cache, tmp_path / "on", terms=terms), progress=False)
    off = train(_cfg(hidden_cache, tmp_path / "off"), progress=False)
    assert on and off
    cka_on = _heldout_cka(hidden_cache, tmp_path / "on" / "final", 1, 1)
    cka_off = _heldout_cka(hidden_cache, tmp_path / "off" / "final", 1, 1)
    assert cka_on > cka_off + 0.05, (cka_on, cka_off)
    logged = train_rows(tmp_path / "on")
    assert logged[-1]["hidden"] < logged[0]["hidden"]  # the term itself goes down
    assert "hidden" not in train_rows(tmp_path / "off")[-1]


def test_projections_are_saved_in_the_run_not_in_the_exported_student(hidden_cache, tmp_path):
    out = tmp_path / "run"
    train(_cfg(hidden_cache, out, steps=6, save_every=3, terms={"hidden": 1.0}), progress=False)
    final = final_weights(out)
    assert not any("projection" in k for k in final) and final.keys() == set(load_file(str(out / "checkpoints" / "step-0000006" / "model" / "model.safetensors")))
    state = load_file(str(out / "checkpoints" / "step-0000006" / "trainer_state.safetensors"))
    proj = {k: v for k, v in state.items() if k.startswith("extra.projections.")}
    # uniform mapping of stored layers 1, 2 of a 2-block teacher onto a 2-block student: (1, 1) and (2, 2), 32 -> 64
    assert sorted(proj) == ["extra.projections.hidden_s1_t1.weight", "extra.projections.hidden_s2_t2.weight"]
    assert all(v.shape == (64, 32) for v in proj.values())


def test_a_resumed_run_with_projections_is_exact(hidden_cache, tmp_path, one_thread):
    cfg = dict(steps=8, save_every=4, keep_checkpoints=2, terms={"hidden": {"weight": 1.0, "metric": "nmse"}})
    whole = tmp_path / "whole"
    train(_cfg(hidden_cache, whole, **cfg), progress=False)
    out = tmp_path / "run"
    train(_cfg(hidden_cache, out, **cfg), progress=False)
    _rewind_to(out, 4, 8)
    train(_cfg(hidden_cache, out, **cfg), progress=False)
    assert_same_weights(final_weights(out), final_weights(whole))


def _rewind_to(out: Path, step: int, last: int) -> None:
    """The state a crash right after step ``step``'s checkpoint leaves."""
    shutil.rmtree(out / "checkpoints" / f"step-{last:07d}")
    (out / "checkpoints" / "latest").write_text(f"step-{step:07d}")
    shutil.rmtree(out / "final")
    (out / "final_metrics.json").unlink()


def test_taps_keep_only_the_layers_asked_for(hidden_cache):
    from kdcache.train.config import StudentConfig
    from kdcache.train.student import build_student

    model, _ = build_student(StudentConfig(**STUDENT2), open_cache(hidden_cache))
    ids = torch.tensor([[1, 2, 3, 4]])
    model(ids, output_hidden_states=True)  # transformers installs its own output-capturing hooks on a first such forward
    before = (len(model.model.layers[0]._forward_hooks), len(model.model.layers[1].self_attn.q_proj._forward_hooks))
    with taps(model, Needs(hidden=(1,), qkv=(2,))) as (hidden, qkv):
        ref = model(ids, output_hidden_states=True).hidden_states
    assert sorted(hidden) == [1] and sorted(qkv) == [2]
    assert torch.equal(hidden[1], ref[1])
    attn = model.model.layers[1].self_attn
    x = model.model.layers[1].input_layernorm(ref[1])
    assert torch.allclose(qkv[2][0], attn.q_proj(x)) and torch.allclose(qkv[2][2], attn.v_proj(x))
    assert (len(model.model.layers[0]._forward_hooks), len(model.model.layers[1].self_attn.q_proj._forward_hooks)) == before  # removed


def test_exits_teach_the_shallow_layers_to_predict(hidden_cache, tmp_path, one_thread):
    on = train(_cfg(hidden_cache, tmp_path / "on", terms={"exits": {"weight": 1.0, "save_exits": True}}), progress=False)
    off = train(_cfg(hidden_cache, tmp_path / "off"), progress=False)
    assert sorted(on["exits"]) == ["layer-1"]
    exit_dir = tmp_path / "on" / "final" / "exits" / "layer-1"
    assert json.loads((exit_dir / "config.json").read_text())["num_hidden_layers"] == 1
    # the same truncation of the student trained without exits, evaluated the same way
    from kdcache.train.evaluate import evaluate_student
    from kdcache.train.exits import truncated
    from transformers import AutoModelForCausalLM

    plain = truncated(AutoModelForCausalLM.from_pretrained(tmp_path / "off" / "final"), 1)
    plain.save_pretrained(tmp_path / "off-exit")
    shutil.copy(tmp_path / "off" / "final" / "tokenizer.json", tmp_path / "off-exit")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tmp_path / "off" / "final" / name).exists():
            shutil.copy(tmp_path / "off" / "final" / name, tmp_path / "off-exit")
    ppl_on = evaluate_student(str(hidden_cache), str(exit_dir), eval_fraction=0.2)["eval_ppl"]
    ppl_off = evaluate_student(str(hidden_cache), str(tmp_path / "off-exit"), eval_fraction=0.2)["eval_ppl"]
    assert ppl_on == pytest.approx(on["exits"]["layer-1"]["eval_ppl"], rel=1e-4)
    assert ppl_on < 0.8 * ppl_off, (ppl_on, ppl_off)
    assert off.get("exits") is None and not (tmp_path / "off" / "final" / "exits").exists()


def test_a_frozen_module_does_not_move_in_its_stage_and_moves_after(hidden_cache, tmp_path):
    out = tmp_path / "run"
    stages = [{"steps": 4, "freeze": ["model.embed_tokens", "model.layers.0"], "terms": {"hidden": 1.0}},
              {"steps": 0, "loss": "kd", "terms": {}}]
    train(_cfg(hidden_cache, out, steps=8, save_every=4, keep_checkpoints=3, stages=stages), progress=False)
    from kdcache.train.config import StudentConfig
    from kdcache.train.student import build_student

    init = {k: v.clone() for k, v in build_student(StudentConfig(**STUDENT2), open_cache(hidden_cache), seed=0)[0].state_dict().items()}
    at4 = load_file(str(out / "checkpoints" / "step-0000004" / "model" / "model.safetensors"))
    at8 = load_file(str(out / "checkpoints" / "step-0000008" / "model" / "model.safetensors"))
    frozen = [k for k in at4 if k.startswith(("model.embed_tokens", "model.layers.0."))]
    assert frozen and all(torch.equal(at4[k], init[k]) for k in frozen)
    assert all(not torch.equal(at4[k], init[k]) for k in at4 if k.startswith("model.layers.1.") and k.endswith("proj.weight"))
    assert any(not torch.equal(at8[k], at4[k]) for k in frozen)
    logged = train_rows(out)
    assert [r["stage"] for r in logged] == [0] * 4 + [1] * 4
    assert all("hidden" in r for r in logged[:4]) and not any("hidden" in r for r in logged[4:])


def test_resume_across_a_stage_boundary_is_exact(hidden_cache, tmp_path, one_thread):
    stages = [{"steps": 3, "loss": "none", "terms": {"hidden": {"weight": 1.0, "mapping": "last"}}, "freeze": ["lm_head"]},
              {"steps": 0, "alpha": 0.9}]
    cfg = dict(steps=8, save_every=2, keep_checkpoints=4, stages=stages)
    whole = tmp_path / "whole"
    train(_cfg(hidden_cache, whole, **cfg), progress=False)
    out = tmp_path / "run"
    train(_cfg(hidden_cache, out, **cfg), progress=False)
    for step in (6, 8):
        shutil.rmtree(out / "checkpoints" / f"step-{step:07d}")
    (out / "checkpoints" / "latest").write_text("step-0000004")  # one step past the boundary at 3
    shutil.rmtree(out / "final")
    (out / "final_metrics.json").unlink()
    train(_cfg(hidden_cache, out, **cfg), progress=False)
    assert_same_weights(final_weights(out), final_weights(whole))
    (out / "checkpoints" / "latest").write_text("step-0000002")  # before the boundary
    for step in (4, 6, 8):
        shutil.rmtree(out / "checkpoints" / f"step-{step:07d}", ignore_errors=True)
    shutil.rmtree(out / "final")
    (out / "final_metrics.json").unlink()
    train(_cfg(hidden_cache, out, **cfg), progress=False)
    assert_same_weights(final_weights(out), final_weights(whole))


@pytest.mark.parametrize("kw, message", [
    (dict(terms={"hiden": 1.0}), r"unknown loss term terms.hiden; did you mean hidden\?"),
    (dict(terms={"hidden": {"metric": "l1"}}), r"terms.hidden.metric: 'l1' is not one of 'mse', 'cosine', 'nmse'"),
    (dict(terms={"hidden": {"mapping": [[1, 5]]}}), r"teacher's layer 5, which the cache does not hold \(it has \[1, 2\]\).*hidden_layers=\[5\]"),
    (dict(terms={"hidden": {"mapping": [[3, 1]]}}), r"student layer 3, but the student has layers 0..2"),
    (dict(terms={"hidden": {"projection": "none"}}), r"student's width 32 differs from the cached teacher's 64; use --set terms.hidden.projection=linear"),
    (dict(terms={"attention": 1.0}), r"terms.attention needs the cache's attention block.*attention_layers="),
    (dict(terms={"exits": {"layers": [2]}}), r"terms.exits.layers must be blocks 1..1 of the 2-block student"),
    (dict(loss="none"), r"loss none and no terms"),
    (dict(stages=[{"steps": 50}]), r"stages' steps add up to 50 but the run has steps 40"),
    (dict(stages=[{"steps": 4, "freeze": ["model.layer.0"]}, {}]), r"stages\[0\].freeze: 'model.layer.0' matches no student parameter"),
    (dict(stages=[{"steps": 4, "terms": {"hidden": {"mapping": "first"}}}, {}]), r"stages\[0\].terms.hidden.mapping must be uniform, last or a list"),
])
def test_bad_term_settings_are_one_line_before_the_run_dir_exists(hidden_cache, tmp_path, kw, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message) as err:
        train(_cfg(hidden_cache, out, **kw), progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_the_cli_takes_terms_and_reports_a_bad_one_in_one_line(hidden_cache, tmp_path):
    from click.testing import CliRunner

    from kdcache.cli.main import main

    args = ["train", "--cache", str(hidden_cache), "--out", str(tmp_path / "run"), "--steps", "2", "--device", "cpu",
            "--set", "student.num_layers=2", "--set", "student.hidden_size=32", "--set", "student.num_heads=2",
            "--set", "student.num_kv_heads=1", "--set", "eval_every=0"]
    ok = CliRunner().invoke(main, [*args, "--set", "terms.hidden.weight=0.5", "--set", "terms.hidden.metric=mse"])
    assert ok.exit_code == 0, ok.output
    assert "hidden" in train_rows(tmp_path / "run")[-1]
    bad = CliRunner().invoke(main, [*args[:4], str(tmp_path / "bad"), *args[5:], "--set", "terms.hidden.mapping=[[1,9]]"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1, bad.output


@pytest.mark.parametrize("kw", [dict(hidden_positions="stride:3"), dict(hidden_positions="fraction:0.3", hidden_codec="int8", hidden_project_dim=8)])
def test_batches_place_a_subset_of_positions_where_the_cache_says(tiny_teacher, text_jsonl, tmp_path, kw):
    """Stored positions (and only those) are marked and hold the stored rows; a run on such a cache trains."""
    from kdcache.pipeline.config import DataConfig, GenerateConfig
    from kdcache.pipeline.generate import generate
    from kdcache.train.data import collate

    cache = tmp_path / "cache"
    generate(GenerateConfig(teacher=str(tiny_teacher), out=str(cache), top_k=8, hidden_layers=[2], data=DataConfig(source=str(text_jsonl), max_length=64, max_rows=12), **kw), progress=False)
    examples = list(open_cache(cache).stream(columns=["example_id", "input_ids", "loss_mask", "hidden_2", "hidden_positions"]))[:5]
    batch = collate(examples)
    for i, ex in enumerate(examples):
        assert np.flatnonzero(batch.signals["hidden_mask"][i].numpy()).tolist() == list(ex["hidden_positions"])
        np.testing.assert_array_equal(batch.signals["hidden_2"][i][batch.signals["hidden_mask"][i]].numpy(), ex["hidden_2"])
    train(_cfg(cache, tmp_path / "run", steps=3, eval_fraction=0.0, terms={"hidden": 1.0}), progress=False)
    assert np.isfinite(train_rows(tmp_path / "run")[-1]["hidden"])


def test_stages_given_as_mappings_are_typed_without_touching_the_callers_list():
    from kdcache.train.config import StageConfig, TrainConfig

    given = [{"steps": 3, "freeze": ["lm_head"]}, {}]
    cfg = TrainConfig(stages=given)
    assert cfg.stages == [StageConfig(steps=3, freeze=["lm_head"]), StageConfig()]
    assert given == [{"steps": 3, "freeze": ["lm_head"]}, {}]
    with pytest.raises(ConfigError, match=r"stages\[1\].stpes \(did you mean stages\[1\].steps\?\)"):
        TrainConfig(stages=[{}, {"stpes": 2}])
