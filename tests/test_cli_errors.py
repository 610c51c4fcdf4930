"""Every mistake a new user makes gets one true line: exit code 2, a single ``error:`` line on stderr, no
traceback, no Python ``None``, the words that name the fix, and nothing written to the output folder.

Adding the next mistake is one row in ``MISTAKES``: the command line (placeholders below) and the words the
line must contain. Placeholders: {teacher} a tiny real model folder, {data} a JSONL file, {empty} an empty
one, {cache} a top-k-only cache, {run} a training run folder, {tmp} a scratch folder, {bad_yaml},
{typo_yaml} config files with a syntax error and with three misspelt keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdcache.cli import main

G = "generate --teacher {teacher} --dataset {data} --top-k 8 --max-length 32 --out {tmp}/out"
T = "train --cache {cache} --out {tmp}/out"

MISTAKES: list[tuple[str, str, tuple[str, ...]]] = [
    # (id, command line, words the one line must contain)
    ("missing-local-dataset", "generate --teacher {teacher} --dataset mydata.jsonl --top-k 8 --out {tmp}/out", ("mydata.jsonl", "not found", "--dataset")),
    ("empty-dataset", "generate --teacher {teacher} --dataset {empty} --top-k 8 --out {tmp}/out", ("no rows", "--dataset")),
    ("bad-field", G + " --field body", ("'body'", "--field", "text")),
    ("hidden-layers-not-numbers", G + " --hidden-layers 6,abc", ("--hidden-layers", "6,12,-1", "'6,abc'")),
    ("missing-teacher-path", "generate --teacher ./nosuch --dataset {data} --top-k 8 --out {tmp}/out", ("./nosuch", "--teacher")),
    ("no-teacher", "generate --dataset {data} --top-k 8 --out {tmp}/out", ("--teacher",)),
    ("top-k-negative", G.replace("--top-k 8", "--top-k -1"), ("top_k", "got -1")),
    ("top-k-over-vocab", G.replace("--top-k 8", "--top-k 99999"), ("--top-k 107",)),
    ("max-length-1", G.replace("--max-length 32", "--max-length 1"), ("max_length", "at least 2", "got 1")),
    ("max-rows-0", G + " --set data.max_rows=0", ("data.max_rows must be positive", "got 0")),
    ("set-wrong-type", G + " --set batch_tokens=abc", ("batch_tokens", "integer", "'abc'")),
    ("set-unknown-key", G + " --set nosuch=1", ("unknown config key nosuch", "kdcache fields generate")),
    ("unknown-flag", G + " --bogus-flag", ("--bogus-flag", "kdcache generate --help")),
    ("unknown-recipe", "generate --recipe nosuch --out {tmp}/out", ("unknown recipe 'nosuch'", "rs-kd")),
    ("sampled-tokens-too-many", G + " --sampled-tokens 100000", ("sampled_tokens", "65535", "got 100000")),
    ("missing-cache", "train --cache {tmp}/nosuch --out {tmp}/out", ("does not exist", "kdcache generate")),
    ("unknown-loss", T + " --loss nosuch", ("unknown loss 'nosuch'", "rskd", "kd")),
    ("steps-zero", T + " --steps 0", ("steps must be positive", "got 0", "--set steps=")),
    ("batch-size-zero-and-lr", T + " --batch-size 0 --lr -1", ("batch_size must be positive", "lr must be positive", "got -1")),
    ("steps-not-a-number", T + " --steps abc", ("--steps", "integer", "kdcache train --help")),
    ("set-typo-did-you-mean", T + " --set stpes=3", ("stpes", "did you mean steps?", "kdcache fields train")),
    ("set-with-demo-prefix", T + " --set train.steps=3", ("drop the train. prefix", "steps")),
    ("set-without-value", T + " --set steps", ("--set steps=VALUE",)),
    ("alpha-out-of-range", T + " --alpha 2", ("alpha must be in [0, 1]", "got 2")),
    ("alpha-null", T + " --set alpha=null", ("alpha", "got null")),
    ("schedule-without-end", T + " --set alpha_schedule=cosine", ("alpha_end", "--set alpha_end=")),
    ("rskd-on-topk-cache", T + " --loss rskd", ("sampled", "--sampled-tokens")),
    ("student-hidden-zero", T + " --set student.hidden_size=0", ("student.hidden_size must be positive", "got 0")),
    ("student-heads-do-not-divide", T + " --set student.hidden_size=30", ("student.hidden_size (30)", "student.num_heads")),
    ("eval-fraction-one", T + " --set eval_fraction=1.5", ("eval_fraction must be in [0, 1)", "got 1.5")),
    ("one-peer", T + " --set pseudo_teacher=peers --set pseudo_teachers.peers.count=1", ("pseudo_teachers.peers.count must be at least 2", "got 1")),
    ("unknown-pseudo-teacher", T + " --set pseudo_teacher=emaa", ("unknown pseudo_teacher 'emaa'", "did you mean ema?")),
    ("loss-option-out-of-range", T + " --loss jsd --set losses.jsd.beta=1.5", ("losses.jsd.beta must be in (0, 1)", "got 1.5", "--set losses.jsd.beta=")),
    ("unknown-loss-section", T + " --set losses.jsdd.beta=0.3", ("unknown loss losses.jsdd", "did you mean losses.jsd?")),
    ("term-weight-out-of-range", T + " --set terms.hidden.weight=-1", ("terms.hidden.weight must be at least 0", "got -1")),
    ("loss-option-typo", T + " --set losses.jsd.btea=0.3", ("losses.jsd.btea", "did you mean losses.jsd.beta?", "kdcache fields train")),
    ("old-and-new-key-disagree", T + " --set beta=0.3 --set losses.jsd.beta=0.4", ("beta (0.3) and losses.jsd.beta (0.4) disagree", "drop it")),
    ("curriculum-start-zero", T + " --set curriculum.by=teacher_nll --set curriculum.start=0", ("curriculum.start must be in (0, 1]", "got 0")),
    ("curriculum-unknown-signal", T + " --set curriculum.by=loss", ("curriculum.by", "'teacher_nll'")),
    ("resume-and-overwrite", T + " --resume --overwrite", ("--resume", "--overwrite", "not both")),
    ("student-run-folder", T + " --student {run}", ("training run", "{run}/final")),
    ("student-offline-hub-id", T + " --student nosuchstudent", ("nosuchstudent", "hub is unreachable", "--student")),
    ("eval-run-not-final", "eval --cache {cache} --student {run}", ("training run", "--student {run}/final")),
    ("eval-fraction-flag", "eval --cache {cache} --student {run}/final --eval-fraction 2", ("--eval-fraction", "got 2")),
    ("inspect-missing", "inspect {tmp}/nosuch", ("does not exist", "kdcache generate")),
    ("inspect-not-a-cache", "inspect {data}", ("not a kdcache cache",)),
    ("verify-missing", "verify {tmp}/nosuch", ("does not exist",)),
    ("combine-bad-weights", "combine {cache} {cache} --weights a,b --out {tmp}/out", ("--weights", "'a,b'")),
    ("combine-one-cache", "combine {cache} --weights 1 --out {tmp}/out", ("at least two caches",)),
    ("convert-missing-source", "convert ./nosuch.gguf {tmp}/out", ("./nosuch.gguf", "not found")),
    ("demo-typo", "demo --out {tmp}/out --set train.stpes=3", ("did you mean train.steps?", "kdcache fields demo")),
    ("fields-unknown-command", "fields nosuch", ("'nosuch'", "kdcache fields --help")),
    ("missing-config", "train --config {tmp}/nosuch.yaml", ("does not exist", "--config")),
    ("config-and-recipe", "train --config {bad_yaml} --recipe rs-kd", ("either --config or --recipe",)),
    ("invalid-yaml", "train --config {bad_yaml}", ("line 3, column", "fix the syntax")),
    ("every-typo-in-a-file", "train --config {typo_yaml}", ("did you mean steps?", "did you mean lr?", "did you mean student.hidden_size?")),
]


@pytest.fixture(scope="module")
def places(tiny_teacher, text_jsonl, tiny_cache, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mistakes")
    (root / "empty.jsonl").write_text("")
    run = root / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "bad.yaml").write_text("train:\n  steps: 3\n  lr: 0.1: 2\n")
    (root / "typo.yaml").write_text("train:\n  stpes: 3\n  lrr: 0.1\n  student:\n    hiden_size: 3\n")
    return {
        "teacher": str(tiny_teacher), "data": str(text_jsonl), "empty": str(root / "empty.jsonl"), "cache": str(tiny_cache),
        "run": str(run), "bad_yaml": str(root / "bad.yaml"), "typo_yaml": str(root / "typo.yaml"),
    }


@pytest.mark.parametrize("case, line, words", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_gets_one_true_line(case, line, words, places, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is unreachable by definition, wherever the test runs
    fill = {**places, "tmp": str(tmp_path)}
    args = [a.format(**fill) for a in line.split()]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    message = lines[0]
    for word in words:
        assert word.format(**fill) in message, message
    assert "Traceback" not in result.stderr and "None" not in message, message
    assert not (tmp_path / "out").exists(), "a refused command must not leave an output folder behind"


def test_table_is_big_enough():
    assert len(MISTAKES) >= 25 and len({m[0] for m in MISTAKES}) == len(MISTAKES)


def test_help_lists_every_loss():
    from kdcache.train.losses import LOSSES

    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert all(name in text for name in LOSSES), text


def test_no_teacher_or_torch_import_before_a_usage_error():
    """A usage error is answered before the heavy libraries load (it costs milliseconds, not seconds)."""
    import subprocess
    import sys

    code = ("import sys; from kdcache.cli import main\n"
            "try:\n    main(['generate', '--bogus'])\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "False", "False"], out
