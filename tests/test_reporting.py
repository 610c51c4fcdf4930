"""TensorBoard scalars beside metrics.jsonl (issue 14 §5): the event files, read back with TensorBoard's own
EventAccumulator, hold exactly the rows of metrics.jsonl (as float32, TensorBoard's scalar type), each step once,
also after a crash and resume; a missing tensorboard package or an unknown reporter is one line before training."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from kdcache.cli.main import main
from kdcache.config import to_dict
from kdcache.train import StudentConfig, TrainConfig, train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

STUDENT = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(cache, out, **kw) -> TrainConfig:
    base = dict(cache=str(cache), out=str(out), student=StudentConfig(**STUDENT), loss="kd", alpha=0.5, steps=6,
                batch_size=8, lr=1e-2, warmup_steps=2, log_every=1, eval_every=2, save_every=3, keep_checkpoints=2,
                eval_fraction=0.2, device="cpu", precision="fp32", report_to=["tensorboard"])
    base.update(kw)
    return TrainConfig(**base)


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard should show it: eval rows are those with eval_ fields, values as float32."""
    out: dict[str, list] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        kind = "eval" if any(k.startswith("eval_") for k in row) else "train"
        for k, v in row.items():
            if k != "step":
                out.setdefault(f"{kind}/{k}", []).append((row["step"], float(np.float32(v))))
    return out


def test_tensorboard_scalars_equal_metrics_jsonl_from_the_cli(tiny_cache, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": {**to_dict(make_cfg(tiny_cache, out)), "report_to": []}}))
    r = CliRunner().invoke(main, ["train", "--config", str(config), "--report-to", "tensorboard", "--quiet"])
    assert r.exit_code == 0, r.output
    got, want = scalars(out), expected(out)
    assert {"train/loss", "train/kd", "train/ce", "train/lr", "eval/eval_ppl", "eval/eval_top1_agreement"} <= set(want)
    assert [s for s, _ in want["eval/eval_ppl"]] == [2, 4, 6] and [s for s, _ in want["train/loss"]] == list(range(1, 7))
    assert got == want


def test_resume_after_a_crash_shows_each_step_once(tiny_cache, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(tiny_cache, out), progress=False)
    before = scalars(out)
    # the state a crash after step 6's rows but before its checkpoint leaves: latest = step 3, rows 4..6 logged
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / "step-0000006")
    (ckpts / "latest").write_text("step-0000003")
    shutil.rmtree(out / "final")
    train(make_cfg(tiny_cache, out), progress=False)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # two sessions wrote events
    got = scalars(out)
    assert got == expected(out)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 7)) and [s for s, _ in got["eval/eval_ppl"]] == [2, 4, 6]
    # steps 1..3 are the first session's points, 4..6 the second's (its own timings)
    assert got["train/tokens_per_s"][:3] == before["train/tokens_per_s"][:3]
    assert got["train/loss"] == before["train/loss"]  # exact resume: the same losses


def test_without_report_to_no_tensorboard_folder(tiny_cache, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(tiny_cache, out, steps=2, report_to=[]), progress=False)
    assert not (out / "tensorboard").exists() and (out / "metrics.jsonl").is_file()


@pytest.mark.parametrize("flag, words", [
    ("tensorboard", "report_to tensorboard needs the tensorboard package, which is not installed; run `pip install 'kdcache[tensorboard]'`"),
    ("wandb", "unknown reporter 'wandb' in report_to; valid reporters: tensorboard"),
])
def test_refusals_are_one_line_before_training(tiny_cache, tmp_path, monkeypatch, flag, words):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: find_spec answers None
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--cache", str(tiny_cache), "--out", str(out), "--steps", "2", "--report-to", flag])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert not out.exists()  # refused before the run directory is made
