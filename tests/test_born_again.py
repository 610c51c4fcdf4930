"""Born-again self-distillation (`kdcache born-again`): generation g's student is generation g+1's teacher.

One real run of two generations from the embedded SmolLM2 teacher (a few rows, a few steps) shows the
mechanism: generation 1's cache was written by generation 0's student (its manifest names that folder and
its top-k is that student's own, recomputed here with transformers), and generation 1's student trained
on it. Re-running does no work and gives the same table; a run killed mid-way and re-run ends where an
uninterrupted one does; bad input is one line, exit 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from kdcache.cache import open_cache
from kdcache.cli import main
from kdcache.cli.born_again import BornAgainConfig, born_again
from kdcache.config import build_config
from kdcache.pipeline.recipes import recipe_path

TINY = [
    "generations=2", "generate.data.max_rows=16", "generate.data.max_length=48", "generate.top_k=16",
    "train.steps=4", "train.batch_size=4", "train.eval_fraction=0.25", "train.save_every=2", "train.warmup_steps=1", "train.log_every=1",
    "train.student.hidden_size=32", "train.student.num_layers=1", "train.student.num_heads=2", "train.student.num_kv_heads=1",
    "train.student.intermediate_size=64",
]
# What a row says about the students, not where they live: equal across work folders.
METRICS = ("generation", "teacher", "cache_rows", "cache_tokens", "seed", "steps", "eval_tokens", "eval_ppl", "eval_kd",
           "top1_agreement_original", "top1_agreement_own_teacher", "teacher_ppl")


def _cfg(work: Path, *extra: str) -> BornAgainConfig:
    return build_config(BornAgainConfig, recipe_path("born-again"), {"work": str(work)}, [*TINY, *extra])


def _cli(work: Path, *extra: str):
    args = ["born-again", "--recipe", "born-again", "--out", str(work), "--quiet"]
    for o in [*TINY, *extra]:
        args += ["--set", o]
    return CliRunner().invoke(main, args)


def _metrics(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in METRICS} for r in rows]


@pytest.fixture(scope="module")
def ran(tmp_path_factory, one_thread):
    """Two generations, uninterrupted (one intra-op thread: later runs are compared with it bit for bit)."""
    work = tmp_path_factory.mktemp("born_again") / "work"
    return work, born_again(_cfg(work), progress=False)


@pytest.mark.slow  # the real SmolLM2 teacher
def test_generation_1_is_distilled_from_generation_0s_student(ran):
    import torch
    from transformers import AutoModelForCausalLM

    work, rows = ran
    student0 = work / "gen-0" / "run" / "final"
    c0, c1 = open_cache(work / "gen-0" / "cache"), open_cache(work / "gen-1" / "cache")
    # generation 0 is taught by the original teacher, generation 1 by generation 0's student (transformers backend)
    assert c0.manifest.teacher["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert c1.manifest.teacher["path"] == str(student0.resolve()) and c1.manifest.teacher["backend"] == "transformers"
    assert c1.manifest.tokenizer["fingerprint"] == c0.manifest.tokenizer["fingerprint"]  # the student's final/ carries the tokenizer
    assert c1.manifest.status == "complete" and c1.manifest.num_rows == c0.manifest.num_rows == 16
    # its top-k is generation 0's student's own, recomputed independently (ties in either order)
    model = AutoModelForCausalLM.from_pretrained(student0, dtype=torch.float32).eval()
    for ex0, ex1 in zip(c0.stream(), c1.stream()):
        assert ex0["example_id"] == ex1["example_id"] and np.array_equal(ex0["input_ids"], ex1["input_ids"])
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.as_tensor(ex1["input_ids"][None]).long()).logits[0, :-1].float(), -1).numpy()
        ids, vals = ex1["topk_ids"].astype(np.int64), ex1["topk_logprobs"].astype(np.float64)
        assert np.allclose(np.take_along_axis(lp, ids, 1), vals, atol=1e-2)
        kth = np.sort(lp, 1)[:, -ids.shape[1]]
        assert np.all(vals.min(1) >= kth - 1e-2)  # the cached ids are a top-k of the student's distribution
        assert not np.allclose(ex0["topk_logprobs"].astype(np.float64), vals, atol=0.5)  # not the original teacher's
    # generation 1's student trained on generation 1's cache, with its own seed, evaluated on generation 0's held-out rows
    run1 = yaml.safe_load((work / "gen-1" / "run" / "config.yaml").read_text())
    assert run1["cache"] == str(work / "gen-1" / "cache") and run1["seed"] == 1
    assert run1["eval_cache"] == str(work / "gen-0" / "cache")
    assert json.loads((work / "gen-1" / "trained_on.json").read_text())["settings_hash"] == c1.manifest.settings_hash
    # the table: every generation, agreement with the original teacher and with its own
    assert [r["generation"] for r in rows] == [0, 1] and rows[1]["teacher"] == "gen-0 student"
    assert rows[0]["teacher_ppl"] == rows[1]["teacher_ppl"] and rows[0]["eval_tokens"] == rows[1]["eval_tokens"]
    assert rows[0]["top1_agreement_own_teacher"] == rows[0]["top1_agreement_original"]
    assert all(0 <= r["top1_agreement_original"] <= 1 and r["eval_ppl"] > 0 for r in rows)
    saved = json.loads((work / "generations.json").read_text())
    assert saved["generations"] == rows and saved["eval_cache"] == str(work / "gen-0" / "cache")
    table = (work / "generations.md").read_text()
    assert "| 1 | gen-0 student | 16 |" in table and "top-1 agreement with original teacher" in table


@pytest.mark.slow  # the real SmolLM2 teacher
def test_rerun_does_no_work_and_prints_the_same_table(ran, monkeypatch):
    import kdcache.train.evaluate
    import kdcache.train.loop
    from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher

    work, rows = ran

    def no_work(*a, **k):
        raise AssertionError("a complete generation was redone")

    monkeypatch.setattr(TransformersTeacher, "load", no_work)
    monkeypatch.setattr(kdcache.train.loop, "train", no_work)
    monkeypatch.setattr(kdcache.train.evaluate, "evaluate_student", no_work)
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and "generations" not in p.name}
    r = _cli(work)
    assert r.exit_code == 0, r.output
    assert json.loads((work / "generations.json").read_text())["generations"] == rows
    assert "| 1 | gen-0 student | 16 |" in r.output and "generations.json" in r.output
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow  # the real SmolLM2 teacher
def test_killed_mid_way_then_rerun_ends_like_an_uninterrupted_run(ran, tmp_path, monkeypatch):
    import kdcache.train.loop as loop

    work_a, rows_a = ran
    work = tmp_path / "work"
    (work / "gen-0").mkdir(parents=True)
    shutil.copytree(work_a / "gen-0" / "cache", work / "gen-0" / "cache")  # the same SmolLM2 cache, without scoring it again
    real = loop.save_checkpoint

    def killed_after_gen1_step2(run_dir, step, *a, **k):
        path = real(run_dir, step, *a, **k)
        if Path(run_dir).parent.name == "gen-1" and step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", killed_after_gen1_step2)
    r = _cli(work)
    assert r.exit_code == 130, r.output
    assert "generation 1 (train): generation 0 is complete" in r.output and "step 2" in r.output
    assert not (work / "gen-1" / "run" / "final_metrics.json").exists() and (work / "gen-0" / "run" / "final_metrics.json").is_file()
    monkeypatch.setattr(loop, "save_checkpoint", real)
    r = _cli(work)
    assert r.exit_code == 0, r.output
    rows = json.loads((work / "generations.json").read_text())["generations"]
    assert _metrics(rows) == _metrics(rows_a)
    steps = [json.loads(line)["step"] for line in (work / "gen-1" / "run" / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert steps == [1, 2, 3, 4]  # resumed from the step-2 checkpoint: each step logged once

    # a changed setting is refused, and with overwrite redoes that generation and every later one
    r = _cli(work, "train.lr=0.002")
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "generation 0:" in r.output and "--set overwrite=true" in r.output
    old = open_cache(work / "gen-1" / "cache").manifest.teacher["weights_fingerprint"]
    r = _cli(work, "train.lr=0.002", "overwrite=true")
    assert r.exit_code == 0, r.output
    new = open_cache(work / "gen-1" / "cache").manifest
    assert new.teacher["weights_fingerprint"] != old  # regenerated from the retrained generation 0
    assert json.loads((work / "gen-1" / "trained_on.json").read_text())["settings_hash"] == new.settings_hash
    assert yaml.safe_load((work / "gen-1" / "run" / "config.yaml").read_text())["lr"] == 0.002


@pytest.mark.parametrize("extra, words", [
    (["generations=0"], ("generations must be at least 1", "got 0")),
    (["nosuch=1"], ("unknown config key nosuch", "kdcache fields born-again")),
    (["train.stpes=3"], ("train.stpes", "did you mean train.steps?")),
    (["generate.out=x"], ("born-again sets generate.out", "--out WORK")),
    (["train.overwrite=true"], ("train.overwrite", "--set overwrite=true")),
])
def test_bad_input_is_one_line_exit_2(tmp_path, extra, words):
    r = _cli(tmp_path / "work", *extra)
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error: "), r.output
    assert all(w in r.output for w in words), r.output
    assert not (tmp_path / "work").exists()
