"""``kdcache plot`` (issue 14 §5): a PNG of exactly the asked size from real short runs, each run's curves the
rows of its metrics.jsonl, runs overlaid with a legend; a folder without metrics.jsonl is refused in one line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdcache.cli.main import main
from kdcache.train import StudentConfig, TrainConfig, train

pytest.importorskip("matplotlib")
from kdcache.cli.plot_runs import figure  # noqa: E402

STUDENT = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_runs(tiny_cache, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("plot_runs")
    runs = []
    for loss in ("kd", "ce"):
        out = root / loss
        train(TrainConfig(cache=str(tiny_cache), out=str(out), student=StudentConfig(**STUDENT), loss=loss, alpha=0.5, steps=6,
                          batch_size=8, log_every=1, eval_every=2, save_every=0, eval_fraction=0.2, device="cpu", precision="fp32"),
              progress=False)
        runs.append(out)
    return runs


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_of_the_asked_size(two_runs, tmp_path):
    out = tmp_path / "curves.png"
    r = CliRunner().invoke(main, ["plot", *map(str, two_runs), "--out", str(out), "--width", "900", "--height", "640"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"wrote {out}"
    assert png_size(out) == (900, 640)


def test_each_panel_draws_the_runs_metrics_rows(two_runs):
    fig = figure(two_runs)
    loss_ax, ppl_ax, kd_ax, agree_ax = fig.axes
    for run in two_runs:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        train_rows = [r for r in rows if "loss" in r]
        eval_rows = [r for r in rows if "eval_ppl" in r]
        lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
        for term in ("loss", "ce") + (("kd",) if run.name == "kd" else ()):
            ln = lines[f"{run.name}: {term}"]
            assert list(ln.get_xdata()) == [r["step"] for r in train_rows]
            assert list(ln.get_ydata()) == [r[term] for r in train_rows]
        for ax, field in ((ppl_ax, "eval_ppl"), (kd_ax, "eval_kd"), (agree_ax, "eval_top1_agreement")):
            (ln,) = [x for x in ax.get_lines() if x.get_label() == run.name]
            assert list(ln.get_xdata()) == [2, 4, 6] == [r["step"] for r in eval_rows]
            assert list(ln.get_ydata()) == [r[field] for r in eval_rows]
        assert "kd: kd" in lines and "ce: kd" not in lines  # the CE run logs no KD term
    for ax in fig.axes:  # one legend per panel naming both runs
        texts = " ".join(t.get_text() for t in ax.get_legend().get_texts())
        assert "kd" in texts and "ce" in texts


def test_a_folder_without_metrics_is_refused_in_one_line(two_runs, tmp_path):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    out = tmp_path / "x.png"
    r = CliRunner().invoke(main, ["plot", str(two_runs[0]), str(empty), "--out", str(out)])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {empty} has no metrics.jsonl: not a training run"), r.stderr
    assert not out.exists()
    r = CliRunner().invoke(main, ["plot", str(two_runs[0]), "--out", str(tmp_path / "x.jpg")])
    assert r.exit_code == 2 and "name the file FILE.png" in r.stderr
