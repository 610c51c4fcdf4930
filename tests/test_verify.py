"""No silent corruption: damaged shards raise one-line errors, ``kdcache verify`` finds every one.

Real Parquet files, real byte flips and truncations on disk; no mocks. The cache is small (3+ shards,
a few row groups each) so 200 flips and 20 truncations run in seconds.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from kdcache.cache import CacheWriter, make_signals, open_cache, read_manifest, verify_cache
from kdcache.cache.manifest import MANIFEST_NAME
from kdcache.cli import main
from kdcache.errors import CacheFormatError

VOCAB = 5000
SETTINGS = {"teacher": {"name": "t"}, "tokenizer": {"vocab_size": VOCAB}, "dataset": {"name": "verify"}}
SIGNALS = make_signals(top_k=4, vocab_size=VOCAB, logprob_codec="fp16", hidden_layers=[1], hidden_size=3, sampled_draws=4)


def example(i: int, T: int | None = None) -> dict:
    rng = np.random.default_rng(i)
    T = T or int(rng.integers(2, 20))
    mask = rng.random(T - 1) < 0.7
    sizes = rng.integers(1, 5, size=T - 1).astype(np.uint16)
    lp = -np.sort(rng.uniform(0, 20, size=(T - 1, 4)).astype(np.float32), axis=1)
    return {
        "example_id": str(i),
        "input_ids": rng.integers(0, VOCAB, size=T),
        "loss_mask": mask,
        "topk_ids": rng.integers(0, VOCAB, size=(T - 1, 4)),
        "topk_logprobs": lp,
        "tail_logprob": np.log(rng.uniform(1e-6, 1, size=T - 1)).astype(np.float32),
        "sampled_ids": rng.integers(0, VOCAB, size=int(sizes.sum())),
        "sampled_weights": rng.uniform(0, 1, size=int(sizes.sum())).astype(np.float32),
        "sampled_sizes": sizes,
        "teacher_nll": float(rng.uniform(0, 10)),
        "teacher_entropy": float(rng.uniform(0, 10)),
        "num_loss_tokens": int(mask.sum()),
        "hidden_1": rng.normal(0, 3, size=(T, 3)).astype(np.float32),
    }


def write_cache(path: Path, n: int = 30, examples=None) -> Path:
    w = CacheWriter(path, SETTINGS, SIGNALS, shard_tokens=120, row_group_tokens=40)
    for i, ex in enumerate(examples if examples is not None else (example(i) for i in range(n))):
        w.add_row([ex], i + 1)
    w.close()
    return path


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory) -> Path:
    path = write_cache(tmp_path_factory.mktemp("verify") / "good")
    m = read_manifest(path)
    assert len(m.shards) >= 3 and all(len(s.row_groups) >= 2 for s in m.shards[:-1])
    return path


@pytest.fixture
def copy(good_cache, tmp_path) -> Path:
    dst = tmp_path / "cache"
    shutil.copytree(good_cache, dst)
    return dst


def read_everything(path: Path, **kw) -> list[dict]:
    return list(open_cache(path, **kw).stream())


def same(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for k in x:
            if isinstance(x[k], np.ndarray):
                if x[k].dtype != y[k].dtype or x[k].shape != y[k].shape or not np.array_equal(x[k], y[k], equal_nan=True):
                    return False
            elif x[k] != y[k]:
                return False
    return True


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line(msg: str, *needles: str) -> None:
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# --------------------------------------------------------------------------------------------------
# The property: every flip and truncation is flagged by verify; plain reads never return changed values.


def test_flips_and_truncations_are_never_silent(good_cache, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(good_cache, work)
    shards = read_manifest(good_cache).shards
    pristine = {s.name: (good_cache / s.name).read_bytes() for s in shards}
    total = sum(len(b) for b in pristine.values())
    original = read_everything(good_cache)
    rng = random.Random(20240609)

    def damaged_variants():
        for _ in range(200):  # positions uniform over the bytes of all shards
            pos = rng.randrange(total)
            for s in shards:
                if pos < len(pristine[s.name]):
                    break
                pos -= len(pristine[s.name])
            data = bytearray(pristine[s.name])
            data[pos] ^= rng.randrange(1, 256)
            yield s.name, f"flip at byte {pos}", bytes(data)
        for _ in range(20):
            s = rng.choice(shards)
            cut = rng.randrange(len(pristine[s.name]))
            yield s.name, f"truncation to {cut} bytes", pristine[s.name][:cut]

    outcomes = {"error": 0, "identical": 0}
    regions = set()
    for name, what, data in damaged_variants():
        (work / name).write_bytes(data)  # each variant starts from the pristine bytes of every other shard
        report = verify_cache(work)
        assert not report.ok and [s.name for s in report.bad_shards] == [name], (what, report.lines())
        one_line(report.lines()[0], name, "regenerate")
        # Default reader (sha256 on first open): always the one-line error.
        with pytest.raises(CacheFormatError) as info:
            read_everything(work)
        one_line(str(info.value), name, "kdcache verify", "regenerate")
        # Without the sha256 pass, page CRCs + footer checks: an error, or exactly the original values.
        try:
            got = read_everything(work, verify_sha256=False)
        except CacheFormatError as exc:
            one_line(str(exc), name, "kdcache verify")
            outcomes["error"] += 1
            regions.add("row group" in str(exc))
        else:
            assert same(got, original), f"{what} in {name} changed decoded values silently"
            outcomes["identical"] += 1
        (work / name).write_bytes(pristine[name])
    assert outcomes["error"] > 150, outcomes  # most flips land in page data and fail their CRC
    assert regions == {True, False}  # both footer/open-time and row-group errors were exercised
    assert same(read_everything(work), original)


# --------------------------------------------------------------------------------------------------
# verify: good caches, CLI exit codes and messages


def test_verify_deep_passes_on_a_good_cache(good_cache):
    for deep in (False, True):
        report = verify_cache(good_cache, deep=deep)
        assert report.ok and report.lines() == []
    m = read_manifest(good_cache)
    assert sum(s.row_groups_decoded for s in report.shards) == sum(len(s.row_groups) for s in m.shards)
    r = invoke("verify", good_cache, "--deep")
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cache {good_cache}: ok, {len(m.shards)} shards, {m.num_rows} rows")
    assert "row groups decoded" in lines[0] and r.stderr == ""
    data = json.loads(invoke("verify", good_cache, "--json").stdout)
    assert data["ok"] and data["fix"] is None and len(data["shards"]) == len(m.shards)


def test_verify_cli_flags_a_damaged_shard(copy):
    m = read_manifest(copy)
    victim = copy / m.shards[1].name
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x40
    victim.write_bytes(bytes(data))
    r = invoke("verify", copy)
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    one_line(lines[0], m.shards[1].name, "sha256", "regenerate the cache", "--overwrite")
    r = invoke("verify", copy, "--json")
    assert r.exit_code == 2
    report = json.loads(r.stdout)
    assert not report["ok"] and "--overwrite" in report["fix"]
    assert [s["name"] for s in report["shards"] if not s["ok"]] == [m.shards[1].name]


def test_absent_shard(copy):
    m = read_manifest(copy)
    (copy / m.shards[2].name).unlink()
    report = verify_cache(copy)
    assert [s.name for s in report.bad_shards] == [m.shards[2].name]
    assert "missing" in report.lines()[0]
    with pytest.raises(CacheFormatError) as info:
        open_cache(copy)  # checked on open, before any read
    one_line(str(info.value), m.shards[2].name, "missing", "regenerate")
    r = invoke("verify", copy)
    assert r.exit_code == 2 and "missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_size_mismatch_is_refused_on_open(copy):
    m = read_manifest(copy)
    victim = copy / m.shards[0].name
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(CacheFormatError) as info:
        open_cache(copy)
    one_line(str(info.value), m.shards[0].name, f"{m.shards[0].bytes + 1:,} bytes on disk", f"records {m.shards[0].bytes:,}",
             "kdcache verify", "regenerate")


@pytest.mark.parametrize("field, delta", [("rows", 1), ("tokens", -3), ("row_groups", None)])
def test_manifest_listing_a_wrong_count(copy, field, delta):
    data = json.loads((copy / MANIFEST_NAME).read_text())
    shard = data["shards"][1]
    if field == "row_groups":
        shard["row_groups"] = [shard["row_groups"][0] + 1, shard["row_groups"][1] - 1, *shard["row_groups"][2:]]
    else:
        shard[field] += delta
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    for deep in (False, True):
        report = verify_cache(copy, deep=deep)
        assert [s.name for s in report.bad_shards] == [shard["name"]], report.lines()
    assert "manifest" in report.lines()[0]
    if field != "tokens":  # the reader checks rows per row group against every footer it opens
        with pytest.raises(CacheFormatError) as info:
            read_everything(copy)
        one_line(str(info.value), shard["name"], "footer")


def test_deep_checks_per_row_invariants(tmp_path):
    """Rows that decode fine but break the layout (a writer bug, not a flipped byte) only --deep finds."""
    exs = [example(i) for i in range(12)]
    bad = exs[7]
    bad["topk_ids"] = bad["topk_ids"][:-1]  # T-2 positions of top-k instead of T-1
    bad["topk_logprobs"] = bad["topk_logprobs"][:-1]
    exs[9]["num_loss_tokens"] += 1
    path = write_cache(tmp_path / "c", examples=exs)
    assert verify_cache(path).ok  # bytes, footer and counts are all as written
    report = verify_cache(path, deep=True)
    problems = [p for s in report.bad_shards for p in s.problems]
    assert any("example '7'" in p and "topk_ids" in p for p in problems), problems
    assert any("example '9'" in p and "num_loss_tokens" in p for p in problems), problems
    assert invoke("verify", path, "--deep").exit_code == 2


def test_page_checksums_are_written(good_cache):
    """Every page of every shard carries a CRC: a flip in a data page fails even without the sha256 pass."""
    m = read_manifest(good_cache)
    f = pq.ParquetFile(good_cache / m.shards[0].name)
    col = f.metadata.row_group(0).column(1)  # input_ids
    start = col.data_page_offset
    path = good_cache.parent / "crc"
    shutil.copytree(good_cache, path)
    data = bytearray((path / m.shards[0].name).read_bytes())
    data[start + col.total_compressed_size - 2] ^= 0x01  # inside the page's compressed values
    (path / m.shards[0].name).write_bytes(bytes(data))
    with pytest.raises(CacheFormatError) as info:
        read_everything(path, verify_sha256=False)
    one_line(str(info.value), m.shards[0].name, "row group 0", "CRC")


def test_page_header_flips_without_sha256(good_cache, tmp_path):
    """Page headers are outside the CRC: a flipped ``num_values`` there decodes shorter lists without any
    pyarrow error. Every bit of the first bytes of each page header of one row group, read with the sha256
    pass off: an error (the footer's value counts catch the short lists) or the original values.

    example_id is left out: its data page holds uncompressed dictionary indices, and a flipped level
    length in its header shifts them without any check failing. Only the sha256 pass (on by default,
    and in ``kdcache verify``) covers that; see test_flips_and_truncations_are_never_silent."""
    work = tmp_path / "work"
    shutil.copytree(good_cache, work)
    shard = read_manifest(good_cache).shards[0]
    pristine = (good_cache / shard.name).read_bytes()
    original = read_everything(good_cache)
    rg = pq.ParquetFile(good_cache / shard.name).metadata.row_group(0)
    positions = [rg.column(j).data_page_offset + i for j in range(1, rg.num_columns) for i in range(20)]
    errors = 0
    for pos in positions:
        for bit in range(8):
            data = bytearray(pristine)
            data[pos] ^= 1 << bit
            (work / shard.name).write_bytes(bytes(data))
            try:
                got = read_everything(work, verify_sha256=False)
            except CacheFormatError as exc:
                one_line(str(exc), shard.name)
                errors += 1
            else:
                assert same(got, original), f"bit {bit} of byte {pos} (a page header) changed values silently"
    assert errors > len(positions)


# --------------------------------------------------------------------------------------------------
# A read error mid-file through a command that streams the cache: one line, no traceback


def test_read_error_mid_file_is_one_line_in_the_cli(copy, tmp_path):
    m = read_manifest(copy)
    shard = m.shards[1]
    f = pq.ParquetFile(copy / shard.name)
    col = f.metadata.row_group(1).column(3)  # topk_ids of the shard's second row group
    data = bytearray((copy / shard.name).read_bytes())
    data[col.data_page_offset + col.total_compressed_size - 2] ^= 0x08
    (copy / shard.name).write_bytes(bytes(data))
    other = tmp_path / "other"
    shutil.copytree(copy, other)  # the same examples (and the same damage): combine accepts the pair
    r = invoke("combine", copy, other, "--weights", "0.5,0.5", "--out", tmp_path / "mix")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    one_line(lines[0], str(copy), shard.name, "row group 1", "kdcache verify", "regenerate")


def test_verify_deep_on_a_generated_cache(tiny_cache):
    """A real `generate` cache (tiny teacher, several shards): clean under every check, no false alarms."""
    report = verify_cache(tiny_cache, deep=True)
    assert report.ok, report.lines()
    assert len(report.shards) >= 2 and report.tokens == sum(len(ex["input_ids"]) for ex in open_cache(tiny_cache).stream())


def test_verify_not_a_cache(tmp_path):
    r = invoke("verify", tmp_path / "nope")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "does not exist" in r.stderr


def test_inspect_of_a_damaged_cache_is_one_line(copy):
    """inspect reads through the reader too: damage in a column it reads names the shard, never a raw Arrow
    traceback (inspect skips the whole-file sha256, so the flip goes into a statistics column's pages)."""
    m = read_manifest(copy)
    victim = copy / m.shards[0].name
    md = pq.ParquetFile(victim).metadata.row_group(0)
    col = next(md.column(i) for i in range(md.num_columns) if md.column(i).path_in_schema == "teacher_nll")
    data = bytearray(victim.read_bytes())
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data[start + col.total_compressed_size - 3] ^= 0x10  # inside the chunk's last page, past its header
    victim.write_bytes(bytes(data))
    r = invoke("inspect", copy)
    assert r.exit_code == 2
    one_line(r.stderr, m.shards[0].name)


# --------------------------------------------------------------------------------------------------
# A damaged disk: the shard cannot be stat'ed or read. One problem line for that shard, never a traceback.


def test_shard_replaced_by_a_directory(copy):
    m = read_manifest(copy)
    victim = copy / m.shards[1].name
    victim.unlink()
    victim.mkdir()
    report = verify_cache(copy)
    assert [s.name for s in report.bad_shards] == [m.shards[1].name]
    one_line(report.lines()[0], m.shards[1].name, "not a regular file", "regenerate")
    r = invoke("verify", copy)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a regular file" in r.stderr


def _fail_on(monkeypatch, module, name, victim: Path, err: int) -> None:
    real = getattr(module, name)

    def call(path, *a, **kw):
        if Path(os.fspath(path)) == victim:
            raise OSError(err, os.strerror(err), os.fspath(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(module, name, call)


@pytest.mark.parametrize("call", ["stat", "open"])
def test_io_error_reading_a_shard_is_a_problem_line(copy, monkeypatch, call):
    """EIO from the OS (a failing disk) on stat or on reading the bytes for sha256."""
    import builtins

    m = read_manifest(copy)
    victim = copy / m.shards[2].name
    _fail_on(monkeypatch, os if call == "stat" else builtins, call, victim, errno.EIO)
    for deep in (False, True):
        report = verify_cache(copy, deep=deep)
        assert [s.name for s in report.bad_shards] == [m.shards[2].name], report.lines()
        one_line(report.lines()[0], m.shards[2].name, "cannot be read", "Input/output error", "regenerate")
    r = invoke("verify", copy)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "Input/output error" in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_unreadable_shard_is_a_problem_line(copy):
    m = read_manifest(copy)
    victim = copy / m.shards[0].name
    victim.chmod(0)
    try:
        report = verify_cache(copy)
        one_line(report.lines()[0], m.shards[0].name, "cannot be read", "Permission denied")
    finally:
        victim.chmod(0o644)
