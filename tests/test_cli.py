"""Tests of the ``kdcache`` command line (kdcache.cli.main).

Most commands run in-process through click's CliRunner; the exit-code contract is also checked on a real
``python -m kdcache`` subprocess and the installed ``kdcache`` console script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdcache.cache import open_cache, read_manifest
from kdcache.cli import main

SMALL_STUDENT = [
    "--set", "student.hidden_size=32", "--set", "student.num_heads=2", "--set", "student.num_kv_heads=1",
    "--set", "student.intermediate_size=64", "--set", "student.num_layers=1",
]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *needles: str) -> str:
    """Exit code 2 and exactly one line on stderr, starting with 'error:'."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def cli_cache(tiny_teacher, text_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "cache"
    r = invoke("generate", "--teacher", tiny_teacher, "--dataset", text_jsonl, "--out", out, "--top-k", "8",
               "--max-rows", "32", "--max-length", "32", "--hidden-layers", "-1", "--quiet")
    assert r.exit_code == 0, r.output
    assert f"cache {out}: 32 rows" in r.stdout and "(complete)" in r.stdout
    return out


@pytest.fixture(scope="module")
def trained_run(cli_cache, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("cli") / "run"
    r = invoke("train", "--cache", cli_cache, "--out", run, *SMALL_STUDENT, "--steps", "3", "--batch-size", "4",
               "--set", "eval_fraction=0.25", "--quiet")
    assert r.exit_code == 0, r.output
    return run, json.loads(r.stdout)


def test_generate_writes_the_requested_cache(cli_cache):
    m = read_manifest(cli_cache)
    assert m.status == "complete" and m.num_rows == 32 and m.top_k == 8
    assert m.settings["dataset"]["max_length"] == 32 and m.settings["dataset"]["max_rows"] == 32
    assert m.signals["hidden"]["layers"] == [2]  # --hidden-layers -1 on the 2-layer teacher
    assert max(len(e["input_ids"]) for e in open_cache(cli_cache)) <= 32


def test_inspect_text(cli_cache):
    r = invoke("inspect", cli_cache)
    assert r.exit_code == 0, r.output
    assert "rows         32" in r.stdout
    assert "top-k        8" in r.stdout
    assert "B/token" in r.stdout and "teacher ppl" in r.stdout


def test_inspect_json(cli_cache, tiny_teacher):
    r = invoke("inspect", cli_cache, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    m = read_manifest(cli_cache)
    assert {"rows", "tokens", "bytes_per_token", "teacher", "top_k"} <= set(s)
    assert s["rows"] == 32 and s["tokens"] == m.num_tokens and s["top_k"] == 8
    assert s["bytes_per_token"] == pytest.approx(m.num_bytes / m.num_tokens)
    assert s["teacher"]["path"] == str(Path(tiny_teacher).resolve()) and s["teacher"]["backend"] == "transformers"


def test_inspect_plot(cli_cache, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "summary.png"
    r = invoke("inspect", cli_cache, "--plot", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.stdout.rstrip().endswith(f"wrote {png}")
    r = invoke("inspect", cli_cache, "--plot", png, "--json")  # stdout stays JSON; the line goes to stderr
    assert json.loads(r.stdout)["rows"] == 32 and f"wrote {png}" in r.stderr


def test_train_with_overrides(trained_run):
    run, metrics = trained_run
    cfg = json.loads((run / "final" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (32, 2, 1, 64, 1)
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3
    assert metrics["step"] == 3 and metrics["eval_tokens"] > 0 and metrics["eval_ce"] > 0


def test_eval_on_final_student(cli_cache, trained_run):
    run, _ = trained_run
    r = invoke("eval", "--cache", cli_cache, "--student", run / "final", "--eval-fraction", "0", "--max-examples", "8")
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    assert {"eval_ce", "eval_ppl", "eval_kd", "eval_top1_agreement", "teacher_ppl"} <= set(metrics)
    rows = list(open_cache(cli_cache))[:8]
    assert metrics["eval_tokens"] == sum(int(e["num_loss_tokens"]) for e in rows)
    assert 0.0 <= metrics["eval_top1_agreement"] <= 1.0


def test_fields_train_lists_student_keys():
    r = invoke("fields", "train")
    assert r.exit_code == 0
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert "student.hidden_size" in names and "loss" in names and "steps" in names


# --------------------------------------------------------------------------------------------------
# user errors: exit code 2 and one line


def test_train_missing_cache(tmp_path):
    r = invoke("train", "--cache", tmp_path / "nope", "--out", tmp_path / "run")
    assert_user_error(r, "does not exist", "kdcache generate")
    assert not (tmp_path / "run").exists()


def test_train_unknown_loss_lists_valid(cli_cache, tmp_path):
    r = invoke("train", "--cache", cli_cache, "--out", tmp_path / "run", "--loss", "kl")
    assert_user_error(r, "unknown loss 'kl'", "ce, fkl, jsd, kd, rkl")
    assert not (tmp_path / "run").exists()


def test_bad_set_syntax(cli_cache, tmp_path):
    r = invoke("train", "--cache", cli_cache, "--out", tmp_path / "run", "--set", "student.hidden_size")
    assert_user_error(r, "student.hidden_size", "key=value")


def test_unknown_set_key_lists_valid_keys(cli_cache, tmp_path):
    r = invoke("train", "--cache", cli_cache, "--out", tmp_path / "run", "--set", "student.qqq=32")
    assert_user_error(r, "unknown config key student.qqq", "hidden_size", "num_heads")
    r = invoke("train", "--cache", cli_cache, "--out", tmp_path / "run", "--set", "student.hidden=32")
    assert_user_error(r, "unknown config key student.hidden", "did you mean student.hidden_size?")


def test_unknown_yaml_key_lists_valid_keys(cli_cache, tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"train:\n  cache: {cli_cache}\n  out: {tmp_path / 'run'}\n  stepz: 3\n")
    r = invoke("train", "--config", cfg)
    assert_user_error(r, "unknown config key stepz", "steps")


def test_bad_set_value_type(cli_cache, tmp_path):
    r = invoke("train", "--cache", cli_cache, "--out", tmp_path / "run", "--set", "steps=many")
    assert_user_error(r, "steps", "integer")


def test_generate_missing_teacher(text_jsonl, tmp_path):
    r = invoke("generate", "--teacher", tmp_path / "nope", "--dataset", text_jsonl, "--out", tmp_path / "c", "--quiet")
    assert_user_error(r, "not found", "--teacher")
    assert not (tmp_path / "c").exists()


def test_inspect_not_a_cache(tmp_path):
    r = invoke("inspect", tmp_path)
    assert_user_error(r, "not a kdcache cache")


# --------------------------------------------------------------------------------------------------
# the real executable


def test_real_process_exit_codes(tiny_teacher, text_jsonl, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "cache"
    ok = subprocess.run(
        [sys.executable, "-m", "kdcache", "generate", "--teacher", str(tiny_teacher), "--dataset", str(text_jsonl),
         "--out", str(out), "--top-k", "4", "--max-rows", "5", "--max-length", "16", "--quiet"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert f"cache {out}: 5 rows" in ok.stdout
    assert read_manifest(out).status == "complete"

    script = Path(sys.executable).parent / "kdcache"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "kdcache"]
    bad = subprocess.run([*cmd, "inspect", str(tmp_path / "missing")], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0], bad.stderr
