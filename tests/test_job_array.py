"""Generation as a job array: ``generate --num-shards N --shard-index I`` and ``kdcache merge``.

Real tiny teacher and real caches throughout. The reference is one process's cache of the same dataset; three parts
merged must hold exactly its examples (ids, tokens, every column, byte for byte: both runs score one row per teacher
forward, ``batch_tokens=2``, so the arithmetic is the same), train and verify like it, and every refusal is one line
with nothing written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from test_generate import make_cfg
from kdcache.cache import MANIFEST_NAME, TOKENIZER_DIR, CacheWriter, holdout_fraction_filter, open_cache, read_manifest
from kdcache.cache.lock import LOCK_NAME, CacheLock
from kdcache.cache.manifest import listed_name_ok
from kdcache.cache.merge import JOB_ARRAY, merge_parts, shared_settings
from kdcache.cache.verify import verify_cache
from kdcache.cli import main
from kdcache.errors import CacheLockedError, CacheMismatchError, ConfigError, Interrupted
from kdcache.pipeline.generate import generate
from kdcache.pipeline.sharding import from_environment, keeps, owner

pytestmark = pytest.mark.usefixtures("one_thread")  # byte-for-byte comparisons

N = 3
GEN = dict(top_k=8, batch_tokens=2, row_group_tokens=128, shard_tokens=256)  # several shards per part
ENV_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX",
            "JOB_COMPLETION_INDEX", "KDCACHE_NUM_SHARDS")


def cfg(teacher, out, source, **kw):
    return make_cfg(teacher, out, source, data={"max_length": 64}, **{**GEN, **kw})


def part(i: int, n: int = N) -> str:
    return f"part-{i:05d}-of-{n:05d}"


def examples(path) -> dict[str, dict]:
    return {ex["example_id"]: ex for ex in open_cache(path)}


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its sha256."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_examples(a: dict[str, dict], b: dict[str, dict]) -> None:
    """Same ids; per id the same columns, each of the same dtype, shape and bytes."""
    assert sorted(a, key=int) == sorted(b, key=int)
    for key, x in a.items():
        y = b[key]
        assert set(x) == set(y), key
        for col in x:
            u, v = np.asarray(x[col]), np.asarray(y[col])
            assert (u.dtype, u.shape) == (v.dtype, v.shape) and u.tobytes() == v.tobytes(), f"{col} of example {key}"


@pytest.fixture(autouse=True)
def no_scheduler(monkeypatch):
    """Tests run inside a Slurm or Kubernetes job too: only what a test sets is in the environment."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def single(tiny_teacher, text_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "cache"
    generate(cfg(tiny_teacher, out, text_jsonl), progress=False)
    return out


@pytest.fixture(scope="module")
def parts(tiny_teacher, text_jsonl, tmp_path_factory) -> Path:
    """OUT holding the N parts, not merged (copy it before changing it)."""
    out = tmp_path_factory.mktemp("array") / "cache"
    for i in range(N):
        generate(cfg(tiny_teacher, out, text_jsonl, num_shards=N, shard_index=i), progress=False)
    return out


@pytest.fixture
def out(parts, tmp_path) -> Path:
    """A fresh copy of the parts, for a test to change."""
    return Path(shutil.copytree(parts, tmp_path / "cache"))


@pytest.fixture(scope="module")
def merged(parts, tmp_path_factory) -> Path:
    out = Path(shutil.copytree(parts, tmp_path_factory.mktemp("merged") / "cache"))
    merge_parts(out)
    return out


# --------------------------------------------------------------------------------------------------
# the split


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_split_is_a_deterministic_partition(n, tiny_teacher, text_jsonl, tmp_path):
    rows = range(1000)
    holders = [[i for i in range(n) if keeps(cfg(tiny_teacher, tmp_path, text_jsonl, num_shards=n, shard_index=i))(r)] for r in rows]
    assert all(len(h) == 1 for h in holders)  # every row in exactly one part
    assert [h[0] for h in holders] == [owner(r, n) for r in rows] == [r % n for r in rows]  # the documented rule, every time
    sizes = np.bincount([h[0] for h in holders], minlength=n)
    assert sizes.max() - sizes.min() <= 1  # balanced


def test_parts_hold_the_global_row_ids_of_their_rows(single, parts):
    ids = set(examples(single))
    seen: set[str] = set()
    for i in range(N):
        mine = set(examples(parts / part(i)))
        assert mine and all(int(e) % N == i for e in mine)  # example id = the global input row index
        assert not mine & seen
        seen |= mine
    assert seen == ids


def test_settings_without_a_split_are_unchanged(single, tiny_teacher, text_jsonl, tmp_path):
    """num_shards=1 given (or read from an environment without a job array) writes today's cache, byte for byte."""
    one = tmp_path / "one"
    unsplit = from_environment(cfg(tiny_teacher, one, text_jsonl), env={})
    assert (unsplit.num_shards, unsplit.shard_index) == (1, 0)
    generate(unsplit, progress=False)
    a, b = read_manifest(single), read_manifest(one)
    assert JOB_ARRAY not in a.settings and JOB_ARRAY not in b.settings
    assert a.settings_hash == b.settings_hash
    assert [(s.name, s.sha256) for s in a.shards] == [(s.name, s.sha256) for s in b.shards]
    assert not any(p.name.startswith("part-0000") and p.is_dir() for p in one.iterdir())


def test_parts_differ_in_their_part_only(single, parts):
    ms = [read_manifest(parts / part(i)) for i in range(N)]
    assert len({m.settings_hash for m in ms}) == N
    assert all(m.settings[JOB_ARRAY] == {"num_shards": N, "shard_index": i, "rule": "input_row % num_shards == shard_index"}
               for i, m in enumerate(ms))
    assert all(shared_settings(m.settings) == read_manifest(single).settings for m in ms)


# --------------------------------------------------------------------------------------------------
# defaults from the scheduler's environment

S = {"SLURM_ARRAY_TASK_MIN": "0"}
ENV_CASES = [
    # (id, environment, --num-shards, --shard-index, (N, I) or words of the refusal)
    ("nothing", {}, None, None, (1, 0)),
    ("slurm", {**S, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MAX": "3"}, None, None, (4, 2)),
    ("slurm-no-count", {**S, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MAX": "9"}, None, None, (10, 2)),
    ("slurm-from-1-last", {"SLURM_ARRAY_TASK_ID": "10", "SLURM_ARRAY_TASK_COUNT": "10", "SLURM_ARRAY_TASK_MIN": "1",
                           "SLURM_ARRAY_TASK_MAX": "10"}, None, None, ("go up to 10", "--array=0-9")),
    ("slurm-from-1-first", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "10", "SLURM_ARRAY_TASK_MIN": "1",
                            "SLURM_ARRAY_TASK_MAX": "10"}, None, None, ("go up to 10", "--array=0-9")),
    ("slurm-rerun-with-count", {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "3",
                                "SLURM_ARRAY_TASK_MAX": "7"}, 10, None, (10, 7)),
    ("slurm-rerun-without-count", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "3",
                                   "SLURM_ARRAY_TASK_MAX": "7"}, None, None, ("go up to 7", "whole split's --num-shards")),
    ("slurm-rerun-one-without-count", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "3",
                                       "SLURM_ARRAY_TASK_MAX": "3"}, None, None, ("go up to 3", "--num-shards")),
    ("slurm-one-task", {**S, "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MAX": "0"}, None, None, (1, 0)),
    ("slurm-sweep", {**S, "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MAX": "7"}, 1, None, (1, 0)),
    ("slurm-given", {**S, "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MAX": "7"}, 6, 1, (6, 1)),
    ("slurm-count-var", {**S, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MAX": "3",
                         "KDCACHE_NUM_SHARDS": "8"}, None, None, (8, 2)),
    ("slurm-id-only", {"SLURM_ARRAY_TASK_ID": "2"}, None, None, ("SLURM_ARRAY_TASK_ID=2", "--num-shards N")),
    ("slurm-not-a-number", {**S, "SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, None, None,
     ("SLURM_ARRAY_TASK_ID='x'", "whole number")),
    ("k8s-flag", {"JOB_COMPLETION_INDEX": "3"}, 5, None, (5, 3)),
    ("k8s-count-var", {"JOB_COMPLETION_INDEX": "3", "KDCACHE_NUM_SHARDS": "5"}, None, None, (5, 3)),
    ("k8s-no-count", {"JOB_COMPLETION_INDEX": "3"}, None, None, ("JOB_COMPLETION_INDEX=3", "--num-shards N", "KDCACHE_NUM_SHARDS",
                                                              "--num-shards 1")),
    ("k8s-index-too-big", {"JOB_COMPLETION_INDEX": "5"}, 5, None, ("JOB_COMPLETION_INDEX=5", "not below")),
    ("k8s-one-cache", {"JOB_COMPLETION_INDEX": "3"}, 1, None, (1, 0)),
    ("count-without-part", {}, 4, None, ("4 parts", "--shard-index I")),
    ("part-without-count", {}, None, 2, ("shard_index 2", "below num_shards 1")),
    ("part-too-big", {}, 3, 3, ("shard_index 3", "below num_shards 3")),
    ("count-zero", {"KDCACHE_NUM_SHARDS": "0"}, None, None, ("KDCACHE_NUM_SHARDS is 0", "positive")),
]


@pytest.mark.parametrize("case, env, n, i, expected", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_job_array_defaults_from_the_environment(case, env, n, i, expected, tiny_teacher, text_jsonl, tmp_path):
    if isinstance(expected, tuple) and all(isinstance(x, int) for x in expected):
        got = from_environment(cfg(tiny_teacher, tmp_path, text_jsonl, num_shards=n, shard_index=i), env=env)
        assert (got.num_shards, got.shard_index) == expected
        return
    with pytest.raises(ConfigError) as info:
        from_environment(cfg(tiny_teacher, tmp_path, text_jsonl, num_shards=n, shard_index=i), env=env)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in expected), message


def test_cli_takes_the_part_from_slurm(tiny_teacher, text_jsonl, parts, tmp_path, monkeypatch):
    for name, value in {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": str(N), "SLURM_ARRAY_TASK_MIN": "0",
                        "SLURM_ARRAY_TASK_MAX": str(N - 1)}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "cache"
    args = ["generate", "--teacher", str(tiny_teacher), "--dataset", str(text_jsonl), "--max-length", "64", "--top-k", "8",
            "--device", "cpu", "--batch-tokens", "2", "--quiet", "--set", "row_group_tokens=128", "--set", "shard_tokens=256"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"cache {out / part(1)}: ")
    assert sorted(p.name for p in out.iterdir()) == [part(1)]
    assert read_manifest(out / part(1)).settings_hash == read_manifest(parts / part(1)).settings_hash
    # a Kubernetes Indexed Job that does not say how many parts: one line, nothing written
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "k8s")], catch_exceptions=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "KDCACHE_NUM_SHARDS" in result.stderr, result.stderr
    assert not (tmp_path / "k8s").exists()


# --------------------------------------------------------------------------------------------------
# resume


def test_rerunning_a_complete_part_does_no_work(tiny_teacher, text_jsonl, out, caplog):
    before = snapshot(out)
    with caplog.at_level(logging.INFO, logger="kdcache"):
        m = generate(cfg(tiny_teacher, out, text_jsonl, num_shards=N, shard_index=2), progress=False)
    assert m.status == "complete" and "already complete" in caplog.text
    assert snapshot(out) == before


def test_a_killed_part_resumes_after_its_last_committed_row(tiny_teacher, text_jsonl, parts, tmp_path, monkeypatch, caplog):
    out = tmp_path / "cache"
    real = CacheWriter.add_row
    calls = []

    def dies_after_seven_rows(self, examples, input_rows_end):
        calls.append(input_rows_end)
        if len(calls) > 7:
            raise KeyboardInterrupt  # as Ctrl-C or a scheduler's SIGTERM in the CLI
        return real(self, examples, input_rows_end)

    monkeypatch.setattr(CacheWriter, "add_row", dies_after_seven_rows)
    with pytest.raises(Interrupted, match=r"kept \d+ shards? .* in .*part-00001-of-00003; rerun the same command"):
        generate(cfg(tiny_teacher, out, text_jsonl, num_shards=N, shard_index=1, commit_seconds=1e-6), progress=False)
    assert all(end % N == 2 for end in calls)  # only rows i with i % 3 == 1 reach the writer (input_rows_end = i + 1)
    kept = read_manifest(out / part(1))
    end = kept.shards[-1].input_rows_end
    assert kept.status == "in_progress" and kept.shards and end < 64
    monkeypatch.setattr(CacheWriter, "add_row", real)
    with caplog.at_level(logging.INFO, logger="kdcache"):
        generate(cfg(tiny_teacher, out, text_jsonl, num_shards=N, shard_index=1, commit_seconds=1e-6), progress=False)
    assert f"resuming after input row {end}" in caplog.text
    assert read_manifest(out / part(1)).status == "complete"
    assert len(open_cache(out / part(1))) == len(open_cache(parts / part(1)))  # no row twice
    assert_same_examples(examples(out / part(1)), examples(parts / part(1)))


# --------------------------------------------------------------------------------------------------
# merge


def test_merged_cache_holds_the_single_runs_examples(single, parts, merged):
    m = read_manifest(merged)
    assert m.status == "complete" and m.created_by == "kdcache merge"
    assert m.num_rows == read_manifest(single).num_rows == 64
    assert [s.name for s in m.shards] == [f"{part(i)}/{s.name}" for i in range(N) for s in read_manifest(parts / part(i)).shards]
    assert shared_settings(m.settings) == read_manifest(single).settings and m.signals == read_manifest(single).signals
    a, b = examples(single), examples(merged)
    assert_same_examples(a, b)
    held = holdout_fraction_filter(0.2)
    assert {e for e in a if held(e)} == {e for e in b if held(e)}  # the same held-out split
    # no data copied: OUT gained a manifest and a tokenizer, the parts are untouched
    assert snapshot(merged) == {**snapshot(parts), **{k: v for k, v in snapshot(merged).items() if k.split("/")[0] in (MANIFEST_NAME, TOKENIZER_DIR)}}
    assert sorted(p.name for p in merged.iterdir()) == sorted([MANIFEST_NAME, TOKENIZER_DIR, *(part(i) for i in range(N))])
    # a shuffled stream (what training reads) sees every example once
    ids = [ex["example_id"] for ex in open_cache(merged).stream(shuffle=True, seed=3, columns=["example_id"])]
    assert sorted(ids, key=int) == sorted(a, key=int)
    import pyarrow.dataset as ds  # still a Parquet dataset (recursive discovery skips _ and . names)

    assert ds.dataset(str(merged), format="parquet").count_rows() == 64


def test_verify_inspect_and_train_work_on_a_merged_cache(merged, tmp_path):
    report = verify_cache(merged, deep=True)
    assert report.ok and report.rows == 64 and report.status == "complete"
    runner = CliRunner()
    for args in (["verify", str(merged), "--deep"], ["inspect", str(merged)]):
        result = runner.invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, (args, result.stderr)
    assert "rows         64  in " in result.stdout
    from kdcache.train import StudentConfig, TrainConfig, train

    train(TrainConfig(cache=str(merged), out=str(tmp_path / "run"), student=StudentConfig(hidden_size=32, num_layers=1, num_heads=2,
          num_kv_heads=1, intermediate_size=64), loss="kd", steps=3, batch_size=8, eval_every=0, save_every=0, device="cpu",
          precision="fp32"), progress=False)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert (tmp_path / "run" / "final").is_dir() and steps and all(np.isfinite(r.get("loss", 0.0)) for r in steps)


def test_a_damaged_shard_of_a_merged_cache_names_its_part(parts, tmp_path):
    out = Path(shutil.copytree(parts, tmp_path / "cache"))
    merge_parts(out)
    shard = out / part(1) / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    report = verify_cache(out)
    assert [s.name for s in report.bad_shards] == [f"{part(1)}/part-00000.parquet"]
    assert "rerun that part's `kdcache generate` task with --overwrite, then `kdcache merge` again" in report.lines()[0]


def test_merge_cli_and_a_rerun_changes_nothing(out):
    result = CliRunner().invoke(main, ["merge", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"cache {out}: 64 rows, {read_manifest(out).num_tokens:,} tokens, 3 parts merged in place " \
                                    f"({len(read_manifest(out).shards)} shards, no data copied)"
    before = snapshot(out)
    again = CliRunner().invoke(main, ["merge", *(str(out / part(i)) for i in range(N)), "--out", str(out)], catch_exceptions=False)
    assert again.exit_code == 0 and snapshot(out) == before


def test_merge_waits_for_no_writer(out):
    """A part whose lock is held (its generate still runs, or an --overwrite started) is not merged."""
    with CacheLock(out / part(1), command="kdcache generate --shard-index 1"):
        before = snapshot(out)
        with pytest.raises(CacheLockedError, match="kdcache generate --shard-index 1"):
            merge_parts(out)
        assert {k: v for k, v in snapshot(out).items() if LOCK_NAME not in k} == {k: v for k, v in before.items() if LOCK_NAME not in k}
    assert not (out / MANIFEST_NAME).exists() and not (out / LOCK_NAME).exists()


def test_a_part_that_holds_no_row_merges(tiny_teacher, tmp_path):
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the value of a list", "a new file is open"]))
    out = tmp_path / "cache"
    for i in range(N):  # 3 parts of 2 rows: part 2 is empty, and complete
        generate(cfg(tiny_teacher, out, data, num_shards=N, shard_index=i), progress=False)
    assert read_manifest(out / part(2)).status == "complete" and not read_manifest(out / part(2)).shards
    assert merge_parts(out).num_rows == 2 and sorted(examples(out)) == ["0", "1"]


def _edit_manifest(folder: Path, change) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _other_cache(out: Path) -> None:
    """OUT is itself a cache (its shards and manifest at the top), the parts inside it."""
    for p in (out / part(0)).iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy)(p, out / p.name)


MERGE_REFUSALS = [
    # (id, how the parts are changed, arguments besides --out, words the one line must contain)
    ("missing-part", lambda o: shutil.rmtree(o / part(1)), [], ("1 part of 3 missing (1;", "--shard-index 1")),
    ("part-given-twice", lambda o: None, [part(0), part(0)], ("given twice",)),
    ("part-copied-under-another-name", lambda o: (shutil.rmtree(o / part(2)), shutil.copytree(o / part(1), o / part(2))), [],
     ("holds part 1 of 3", "renamed or copied")),
    ("incomplete-part", lambda o: _edit_manifest(o / part(2), lambda d: d.update(status="in_progress")), [],
     ("not complete", "rerun its task")),
    ("part-not-started", lambda o: (o / part(2) / MANIFEST_NAME).unlink(), [], (part(2), "cannot be read", "rerun")),
    ("other-settings", lambda o: _edit_manifest(o / part(1), lambda d: d["settings"]["scoring"].update(top_k=4)), [],
     ("different settings", "scoring.top_k")),
    ("other-tokenizer", lambda o: _edit_manifest(o / part(2), lambda d: d["settings"]["tokenizer"].update(fingerprint="x")), [],
     ("different tokenizers",)),
    ("other-signals", lambda o: _edit_manifest(o / part(2), lambda d: d["signals"]["topk"].update(k=4)), [],
     ("different settings", "signals.topk.k")),
    ("missing-shard", lambda o: (o / part(1) / "part-00001.parquet").unlink(), [], ("part-00001.parquet is missing", "--overwrite")),
    ("truncated-shard", lambda o: (o / part(0) / "part-00000.parquet").write_bytes(b"PAR1"), [], ("holds 4 bytes",)),
    ("not-a-part", lambda o: _edit_manifest(o / part(0), lambda d: d["settings"].pop("job_array")), [], ("not a part of a job array",)),
    ("something-else-in-out", lambda o: (o / "notes.txt").write_text("mine"), [], ("'notes.txt'", "besides the parts")),
    ("another-split-in-out", lambda o: shutil.copytree(o / part(0), o / part(0, 4)), [], (part(0, 4), "more than one split")),
    ("another-split-beside-the-parts", lambda o: shutil.copytree(o / part(0), o / part(0, 4)), [part(i) for i in range(N)],
     (part(0, 4), "besides the parts")),
    ("part-outside-out", lambda o: shutil.copytree(o / part(0), o.parent / part(0)), ["../" + part(0)],
     ("is not a part folder of", "move the folder there")),
    ("out-is-a-cache", _other_cache, [], ("'part-00000.parquet'", "besides the parts")),
    ("out-holds-another-manifest", lambda o: (o / MANIFEST_NAME).write_text((o / part(0) / MANIFEST_NAME).read_text()), [],
     ("already holds a cache written by kdcache generate",)),
    ("no-parts", lambda o: [shutil.rmtree(o / part(i)) for i in range(N)], [], ("holds no part folders", "--shard-index I")),
]


@pytest.mark.parametrize("case, change, extra, words", MERGE_REFUSALS, ids=[c[0] for c in MERGE_REFUSALS])
def test_merge_refusals_are_one_line_and_write_nothing(case, change, extra, words, out):
    change(out)
    before = snapshot(out.parent)
    args = ["merge", *(str(out / e) for e in extra), "--out", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (result.exit_code, result.stderr)
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in result.stderr
    assert snapshot(out.parent) == before  # nothing written, no lock left behind


# --------------------------------------------------------------------------------------------------
# what generate refuses around parts and merged caches, and what the writer never removes


def test_generate_refuses_to_mix_splits_and_caches(tiny_teacher, text_jsonl, single, parts, out, tmp_path):
    with pytest.raises(CacheMismatchError, match="parts of another split"):  # a rerun with the wrong count
        generate(cfg(tiny_teacher, out, text_jsonl, num_shards=4, shard_index=1), progress=False)
    with pytest.raises(CacheMismatchError, match="holds the parts of a job array"):  # one whole cache into the parts' folder
        generate(cfg(tiny_teacher, out, text_jsonl), progress=False)
    with pytest.raises(CacheMismatchError, match="is a cache itself"):
        generate(cfg(tiny_teacher, single, text_jsonl, num_shards=N, shard_index=0), progress=False)
    merged = Path(shutil.copytree(parts, tmp_path / "merged"))
    merge_parts(merged)
    before = snapshot(merged)
    with pytest.raises(CacheMismatchError, match="--overwrite would remove them"):
        generate(cfg(tiny_teacher, merged, text_jsonl, num_shards=N, shard_index=0, overwrite=True), progress=False)
    assert generate(cfg(tiny_teacher, merged, text_jsonl, num_shards=N, shard_index=0), progress=False).status == "complete"
    assert snapshot(merged) == before
    assert not (out / part(1, 4)).exists() and not (single / part(0)).exists()


def test_overwriting_a_merged_cache_never_removes_its_parts(tiny_teacher, text_jsonl, parts, tmp_path):
    out = Path(shutil.copytree(parts, tmp_path / "cache"))
    merge_parts(out)
    with pytest.raises(CacheMismatchError, match="different settings"):
        generate(cfg(tiny_teacher, out, text_jsonl), progress=False)
    generate(cfg(tiny_teacher, out, text_jsonl, overwrite=True), progress=False)  # replaced by one process's cache
    assert {k: v for k, v in snapshot(out).items() if k.startswith("part-0000") and "-of-" in k} == snapshot(parts)
    assert read_manifest(out).created_by == "kdcache generate" and len(open_cache(out)) == 64


@pytest.mark.parametrize("name, ok", [
    ("part-00000.parquet", True), ("part-00001-of-00003/part-00000.parquet", True), ("part-123456-of-200000/part-00002.parquet", True),
    ("part-00001-of-00003/../x.parquet", False), ("part-00001-of-00003/part-00000-of-00003/part-00000.parquet", False),
    ("part-1-of-3/part-00000.parquet", False), ("/part-00001-of-00003/part-00000.parquet", False), ("part-00001-of-00003/", False),
    ("sub/part-00000.parquet", False), ("part-00001-of-00003//part-00000.parquet", False), ("part-00001-of-00003\\part-00000.parquet", False),
    ("../part-00001-of-00003/part-00000.parquet", False), ("part-00001-of-00003", False), (3, False),
])
def test_manifest_names_one_level_of_part_folder_only(name, ok):
    assert listed_name_ok(name) is ok
