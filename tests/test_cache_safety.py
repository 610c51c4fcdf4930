"""One writer per cache, and nothing deleted that kdcache did not write (kdcache.cache.lock, writer, manifest).

Everything is real: writers racing in separate processes, a writer killed with SIGKILL, folders written by
``pyarrow.dataset.write_dataset``, the CLI's exit code and one-line message.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from kdcache.cache import CacheWriter, make_signals, open_cache, read_manifest
from kdcache.cache.combine import combine_caches
from kdcache.cache.lock import LOCK_NAME, CacheLock, pid_alive, read_lock
from kdcache.cache.manifest import MANIFEST_NAME, SHARD_RE, TOKENIZER_DIR
from kdcache.cache.writer import is_temp_name
from kdcache.cli import main
from kdcache.errors import CacheFormatError, CacheLockedError, CacheMismatchError, ConfigError, KDCacheError, OutOfSpaceError
from kdcache.pipeline.config import DataConfig, GenerateConfig
from kdcache.pipeline.generate import generate

# Kept as source text so subprocesses write byte-identical rows.
ROWS_SRC = textwrap.dedent(
    """
    import numpy as np

    K, VOCAB = 4, 100

    def rows(i):
        '''Input row i: one small example (every 9th row is bad and has none).'''
        if i % 9 == 4:
            return []
        rng = np.random.default_rng(i)
        T = int(rng.integers(2, 20))
        lp = np.sort(-rng.uniform(0, 9, size=(T - 1, K)).astype(np.float32), axis=1)[:, ::-1].copy()
        return [{
            "example_id": str(i), "input_ids": rng.integers(0, VOCAB, T), "loss_mask": rng.random(T - 1) < 0.7,
            "topk_ids": np.argsort(rng.random((T - 1, VOCAB)), axis=1)[:, :K], "topk_logprobs": lp,
            "tail_logprob": np.full(T - 1, -3.0, np.float32),
            "teacher_nll": 1.0, "teacher_entropy": 2.0, "num_loss_tokens": T - 1,
        }]
    """
)
exec(ROWS_SRC)  # defines K, VOCAB, rows

N_ROWS = 60
SETTINGS = {"teacher": {"name": "safety"}, "tokenizer": {"vocab_size": 100, "fingerprint": "tok"}, "dataset": {"name": "d"}}
SIGNALS = make_signals(top_k=4, vocab_size=100, logprob_codec="fp32")
SMALL = {"shard_tokens": 100, "row_group_tokens": 30}


def expected_ids(stop: int = N_ROWS) -> list[str]:
    return [ex["example_id"] for i in range(stop) for ex in rows(i)]  # noqa: F821 - from ROWS_SRC


def write(path, start=0, stop=N_ROWS, settings=SETTINGS, close=True, **kw) -> CacheWriter:
    w = CacheWriter(path, settings, SIGNALS, **{**SMALL, **kw})
    for i in range(max(start, w.resume_input_row), stop):
        w.add_row(rows(i), i + 1)  # noqa: F821
    if close:
        w.close()
    return w


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` (recursively) with its sha256."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_intact(path: Path, n_rows: int = N_ROWS) -> None:
    """Complete, no lock or temporary file left, manifest rows = shard rows, sha256 and bytes match, ids in order."""
    m = read_manifest(path)
    assert m.status == "complete"
    assert set(os.listdir(path)) == {MANIFEST_NAME} | {s.name for s in m.shards}, os.listdir(path)
    for s in m.shards:
        data = (path / s.name).read_bytes()
        assert len(data) == s.bytes and hashlib.sha256(data).hexdigest() == s.sha256, s.name
        meta = pq.ParquetFile(path / s.name).metadata
        assert meta.num_rows == s.rows and [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == s.row_groups
    assert m.num_rows == len(expected_ids(n_rows))
    assert [ex["example_id"] for ex in open_cache(path).stream(columns=["example_id"])] == expected_ids(n_rows)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not pid_alive(p.pid)
    return p.pid


def plant_lock(path: Path, **fields) -> bytes:
    path.mkdir(parents=True, exist_ok=True)
    info = {"host": socket.gethostname(), "pid": dead_pid(), "started": "2020-01-02T03:04:05+00:00",
            "command": "kdcache generate --out somewhere", "token": "0123456789abcdef", **fields}
    data = json.dumps(info).encode()
    (path / LOCK_NAME).write_bytes(data)
    return data


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------------------------------
# 1. Two real processes racing for one cache

RACE_SRC = ROWS_SRC + textwrap.dedent(
    f"""
    import os, sys, time
    from pathlib import Path
    from kdcache.cache import CacheWriter, make_signals
    from kdcache.errors import CacheLockedError

    root, trials, side = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    signals = make_signals(top_k=4, vocab_size=100, logprob_codec="fp32")
    for t in range(trials):
        while not (root / f"go-{{t}}").exists():
            time.sleep(0.0005)
        try:
            with CacheWriter(root / f"c{{t}}", {SETTINGS!r}, signals, **{SMALL!r}) as w:
                for i in range(w.resume_input_row, {N_ROWS}):
                    w.add_row(rows(i), i + 1)
            result = "OK"
        except CacheLockedError as exc:
            result = "LOCKED " + str(exc)
        except BaseException as exc:
            result = f"ERROR {{type(exc).__name__}}: {{exc}}"
        (root / f".res-{{t}}-{{side}}").write_text(result)
        os.replace(root / f".res-{{t}}-{{side}}", root / f"res-{{t}}-{{side}}")
    """
)


def test_two_processes_racing_for_one_cache_never_damage_it(tmp_path):
    """20 trials, two real processes released at the same instant into one cache (odd trials: through a stale
    lock of a dead process, so both race for the takeover): one writes it, the other fails at once with the
    lock message or later finds it complete; the cache is intact every time."""
    trials = 20
    stale = dead_pid()
    procs = [subprocess.Popen([sys.executable, "-c", RACE_SRC, str(tmp_path), str(trials), side],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for side in "ab"]
    locked = 0
    try:
        time.sleep(0.2)
        for t in range(trials):
            cache = tmp_path / f"c{t}"
            if t % 2:
                plant_lock(cache, pid=stale)
            (tmp_path / f"go-{t}").touch()
            deadline = time.monotonic() + 120
            while not all((tmp_path / f"res-{t}-{s}").exists() for s in "ab"):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
                time.sleep(0.005)
            results = sorted(((tmp_path / f"res-{t}-{s}").read_text() for s in "ab"), key=lambda r: r != "OK")
            assert results[0] == "OK", (t, results)
            if results[1] != "OK":
                assert results[1].startswith("LOCKED "), (t, results)
                msg = results[1]
                assert "being written by another kdcache process" in msg and f"host {socket.gethostname()}" in msg
                assert "wait for it to finish" in msg and str(cache / LOCK_NAME) in msg and "\n" not in msg
                locked += 1
            assert_intact(cache)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # The writers overlap (each writes ~15 fsynced shards): the lock, not luck, kept the caches whole.
    assert locked >= 1, "the two writers never overlapped; the race was not exercised"


# --------------------------------------------------------------------------------------------------
# 2. The lock: refusals, takeover of a dead holder, release


def test_lock_of_another_host_is_never_taken(tmp_path):
    cache = tmp_path / "c"
    write(cache, stop=20, close=False).abort()  # an interrupted cache: the next run resumes it
    before = snapshot(cache)
    planted = plant_lock(cache, host="elsewhere.example", pid=dead_pid())  # dead here, but that says nothing there
    for overwrite in (False, True):
        with pytest.raises(CacheLockedError) as info:
            CacheWriter(cache, {**SETTINGS, "teacher": {"name": "other"}}, SIGNALS, overwrite=overwrite)
        msg = one_line(info.value)
        for needle in ("host elsewhere.example", "since 2020-01-02T03:04:05+00:00", "kdcache generate --out somewhere",
                       "wait for it to finish", f"delete {cache / LOCK_NAME}", str(json.loads(planted)["pid"])):
            assert needle in msg, (needle, msg)
    # --overwrite cleared nothing: the lock is taken before anything is read or removed.
    assert (cache / LOCK_NAME).read_bytes() == planted
    assert {k: v for k, v in snapshot(cache).items() if k != LOCK_NAME} == before
    (cache / LOCK_NAME).unlink()  # what the message says to do
    write(cache, stop=N_ROWS)
    assert_intact(cache)


def test_lock_of_a_live_process_on_this_host_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cache = tmp_path / "c"
        plant_lock(cache, pid=holder.pid)
        with pytest.raises(CacheLockedError, match=f"pid {holder.pid}.*wait for it to finish"):
            CacheWriter(cache, SETTINGS, SIGNALS)
        assert read_lock(cache)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # Once that process is gone, its lock is stale and the next writer takes it over.
    write(cache)
    assert_intact(cache)


def test_second_writer_in_one_process_is_refused_and_lock_released_on_close(tmp_path):
    cache = tmp_path / "c"
    w = write(cache, stop=10, close=False)
    assert read_lock(cache)["pid"] == os.getpid() and read_lock(cache)["host"] == socket.gethostname()
    with pytest.raises(CacheLockedError, match=f"pid {os.getpid()}"):
        CacheWriter(cache, SETTINGS, SIGNALS)
    w.close()
    assert not (cache / LOCK_NAME).exists()
    assert CacheWriter(cache, SETTINGS, SIGNALS).complete  # a complete cache: opened and released at once
    assert not (cache / LOCK_NAME).exists()


def test_lock_released_on_exception_abort_and_garbage_collection(tmp_path):
    cache = tmp_path / "c"
    with pytest.raises(ValueError):
        with CacheWriter(cache, SETTINGS, SIGNALS, **SMALL) as w:
            w.add_row(rows(0), 1)  # noqa: F821
            raise ValueError("boom")
    assert not (cache / LOCK_NAME).exists()
    w = write(cache, stop=5, close=False)
    w.abort()
    assert not (cache / LOCK_NAME).exists()
    with pytest.raises(KDCacheError, match="aborted"):
        w.add_row(rows(5), 6)  # noqa: F821 - an aborted writer no longer holds the lock, so it writes nothing
    w = write(cache, stop=5, close=False)
    del w  # dropped without close: the lock goes with it
    import gc

    gc.collect()
    assert not (cache / LOCK_NAME).exists()
    write(cache)
    assert_intact(cache)


def test_planted_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
    cache = tmp_path / "c"
    write(cache, stop=20, close=False).abort()
    plant_lock(cache)
    w = CacheWriter(cache, SETTINGS, SIGNALS, **SMALL)
    mine = read_lock(cache)
    assert mine["pid"] == os.getpid() and mine["token"] == w._lock.token and sys.argv[0] in mine["command"]
    for i in range(w.resume_input_row, N_ROWS):
        w.add_row(rows(i), i + 1)  # noqa: F821
    w.close()
    assert_intact(cache)


def test_damaged_lock_is_refused_with_the_fix(tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / LOCK_NAME).write_bytes(b"")  # e.g. a process killed between creating and writing it
    with pytest.raises(CacheLockedError, match=f"unreadable lock file.*delete {cache / LOCK_NAME}"):
        CacheWriter(cache, SETTINGS, SIGNALS)


KILL_SRC = ROWS_SRC + textwrap.dedent(
    f"""
    import os, signal, sys
    from kdcache.cache import CacheWriter, make_signals
    w = CacheWriter(sys.argv[1], {SETTINGS!r}, make_signals(top_k=4, vocab_size=100, logprob_codec="fp32"), **{SMALL!r})
    for i in range({N_ROWS}):
        w.add_row(rows(i), i + 1)
        in_flight = any(p.startswith(".part-") for p in os.listdir(sys.argv[1]))
        if len(w.manifest.shards) >= int(sys.argv[2]) and in_flight:
            break
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("committed", [0, 2])
def test_kill_9_leaves_the_lock_and_the_rerun_takes_it_over(tmp_path, committed):
    """A writer killed with SIGKILL (no cleanup at all) leaves its lock, its manifest (written first, so even a
    run killed before its first shard leaves one) and a temporary shard; the rerun takes over and resumes."""
    cache = tmp_path / "c"
    r = subprocess.run([sys.executable, "-c", KILL_SRC, str(cache), str(committed)], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    lock = read_lock(cache)
    assert lock["host"] == socket.gethostname() and not pid_alive(lock["pid"])
    m = read_manifest(cache)
    assert m.status == "in_progress" and len(m.shards) >= committed
    assert any(p.startswith(".part-") and is_temp_name(p) for p in os.listdir(cache))
    w = CacheWriter(cache, SETTINGS, SIGNALS, **SMALL)
    assert read_lock(cache)["pid"] == os.getpid()
    assert w.resume_input_row == (m.shards[-1].input_rows_end if m.shards else 0)
    assert set(os.listdir(cache)) == {MANIFEST_NAME, LOCK_NAME} | {s.name for s in m.shards}  # in-flight work gone
    for i in range(w.resume_input_row, N_ROWS):
        w.add_row(rows(i), i + 1)  # noqa: F821
    w.close()
    assert_intact(cache)


DISK_FULL_SRC = ROWS_SRC + textwrap.dedent(
    f"""
    import os, resource, signal, sys
    from kdcache.cache import CacheWriter, make_signals
    from kdcache.errors import OutOfSpaceError
    resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    w = CacheWriter(sys.argv[1], {SETTINGS!r}, make_signals(top_k=4, vocab_size=100, logprob_codec="fp32"),
                    shard_tokens=10**6, row_group_tokens=30)
    try:
        for i in range({N_ROWS}):
            w.add_row(rows(i), i + 1)
        w.close()
    except OutOfSpaceError:
        # What generate does with a directory it created: the failed write kept the lock, abort cleans up under it.
        w.abort(discard_new=True)
        print("DISCARDED", os.path.exists(sys.argv[1]))
    """
)


def test_failed_first_write_into_a_new_directory_leaves_nothing(tmp_path):
    out = tmp_path / "new"
    r = subprocess.run([sys.executable, "-c", DISK_FULL_SRC, str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "DISCARDED False" in r.stdout, (r.stdout, r.stderr)


def test_cli_reports_a_held_lock_in_one_line_with_exit_code_2(tiny_teacher, text_jsonl, tmp_path):
    out = tmp_path / "c"
    plant_lock(out, host="elsewhere.example")
    r = CliRunner().invoke(main, ["generate", "--teacher", str(tiny_teacher), "--dataset", str(text_jsonl), "--out", str(out),
                                  "--max-rows", "2", "--max-length", "16", "--top-k", "4", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "elsewhere.example" in lines[0] and LOCK_NAME in lines[0]
    assert os.listdir(out) == [LOCK_NAME]


def test_combine_takes_the_lock_and_refuses_its_own_source(tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    write(a, stop=12)
    write(b, stop=12, settings={**SETTINGS, "teacher": {"name": "second"}})
    plant_lock(out, host="elsewhere.example")
    with pytest.raises(CacheLockedError, match="elsewhere.example"):
        combine_caches([a, b], [1, 1], out)
    assert os.listdir(out) == [LOCK_NAME]
    (out / LOCK_NAME).unlink()
    with pytest.raises(ConfigError, match="also one of the caches"):
        combine_caches([a, b], [1, 1], a, overwrite=True)
    assert_intact(a, 12)
    m = combine_caches([a, b], [1, 1], out)
    assert m.status == "complete" and m.num_rows == len(expected_ids(12)) and not (out / LOCK_NAME).exists()


# --------------------------------------------------------------------------------------------------
# 3. Temporary names are unique per process and writer


def test_temporary_names_carry_pid_and_a_random_token(tmp_path):
    cache = tmp_path / "c"
    names = []
    for _ in range(2):
        w = write(cache, stop=3, close=False, shard_tokens=10**6)
        (tmp,) = [p for p in os.listdir(cache) if p.startswith(".part-")]
        assert tmp.startswith(f".part-00000.{os.getpid()}-") and tmp.endswith(".parquet.tmp") and is_temp_name(tmp)
        names.append(tmp)
        w.abort()
    assert names[0] != names[1]


# --------------------------------------------------------------------------------------------------
# 4. Nothing is removed that kdcache did not write


def pyarrow_folder(path: Path, n: int = 30) -> Path:
    rng = np.random.default_rng(0)
    words = "the a of to in and is was for on with as by at from".split()
    texts = [" ".join(rng.choice(words, int(rng.integers(4, 12)))) for _ in range(n)]
    pads.write_dataset(pa.table({"text": texts}), path, format="parquet", max_rows_per_file=10, max_rows_per_group=10)
    assert sorted(os.listdir(path)) == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    return path


def test_pyarrow_dataset_folder_as_dataset_and_out_is_refused_untouched(tiny_teacher, tmp_path):
    """The reported bug: `--dataset data/ --out data/` cleared data/ (every file starts with `part-`)."""
    data = pyarrow_folder(tmp_path / "data")
    before = snapshot(data)
    for overwrite in (False, True):
        cfg = GenerateConfig(teacher=str(tiny_teacher), out=str(data), device="cpu", top_k=4, overwrite=overwrite,
                             data=DataConfig(source=str(data), max_length=16, max_rows=4))
        with pytest.raises(CacheMismatchError) as info:
            generate(cfg, progress=False)
        msg = one_line(info.value)
        assert str(data) in msg and "not a kdcache cache" in msg and "part-0.parquet" in msg and "never other files" in msg
        assert snapshot(data) == before
        with pytest.raises(CacheMismatchError, match="not a kdcache cache"):
            CacheWriter(data, SETTINGS, SIGNALS, overwrite=overwrite)
        assert snapshot(data) == before and sorted(os.listdir(data)) == sorted(before)
    r = CliRunner().invoke(main, ["generate", "--teacher", str(tiny_teacher), "--dataset", str(data), "--out", str(data),
                                  "--max-rows", "4", "--max-length", "16", "--top-k", "4", "--overwrite", "--quiet"],
                           catch_exceptions=False)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a kdcache cache" in r.stderr, r.output
    assert snapshot(data) == before and sorted(os.listdir(data)) == sorted(before)


def test_user_files_beside_a_cache_survive_resume_and_overwrite(tmp_path):
    cache = tmp_path / "c"
    write(cache, stop=30, close=False).abort()
    n_listed = len(read_manifest(cache).shards)
    pyarrow_folder(tmp_path / "ds")
    user = {"part-0.parquet": (tmp_path / "ds" / "part-0.parquet").read_bytes(), "part-12.parquet": b"user",
            "part-0001.parquet": b"four digits", "part-000001.parquet": b"six digits, zero padded",
            "part-00000.parquet.bak": b"backup", ".part-00001.parquet.tmp.mine": b"x", "notes.txt": b"precious"}
    for name, data in user.items():
        (cache / name).write_bytes(data)
    (cache / TOKENIZER_DIR).mkdir()
    (cache / TOKENIZER_DIR / "vocab.json").write_text("{}")
    # kdcache's own in-flight leftovers: a temporary shard, a shard renamed but never listed, a manifest temp.
    ours = [".part-00007.4242-0badcafe.parquet.tmp", ".part-00003.parquet.tmp", f"part-{n_listed:05d}.parquet",
            f".{MANIFEST_NAME}.4242-0badcafe.tmp", f".{TOKENIZER_DIR}.tmp"]
    for name in ours:
        (cache / name).write_bytes(b"half")

    write(cache)  # resume
    assert_only = {MANIFEST_NAME, TOKENIZER_DIR} | {s.name for s in read_manifest(cache).shards} | set(user)
    assert set(os.listdir(cache)) == assert_only
    for name, data in user.items():
        assert (cache / name).read_bytes() == data, name
    assert [ex["example_id"] for ex in open_cache(cache).stream(columns=["example_id"])] == expected_ids()

    old_shards = {s.name for s in read_manifest(cache).shards}
    (cache / ".part-00002.4242-0badcafe.parquet.tmp").write_bytes(b"half")
    w = CacheWriter(cache, {**SETTINGS, "teacher": {"name": "other"}}, SIGNALS, overwrite=True, **SMALL)
    # --overwrite removed the listed shards, the tokenizer and kdcache temp files; the user's files all stay.
    assert set(os.listdir(cache)) == {MANIFEST_NAME, LOCK_NAME} | set(user)
    assert not old_shards & set(os.listdir(cache))
    for i in range(5):
        w.add_row(rows(i), i + 1)  # noqa: F821
    w.close()
    for name, data in user.items():
        assert (cache / name).read_bytes() == data, name
    assert [ex["example_id"] for ex in open_cache(cache).stream(columns=["example_id"])] == expected_ids(5)


def test_folder_with_only_kdcache_temp_files_and_no_manifest(tmp_path):
    """A run that died while writing its very first manifest: accepted, and even then nothing is removed
    until a manifest exists; the next run (manifest present) cleans the leftover."""
    cache = tmp_path / "c"
    cache.mkdir()
    leftover = cache / f".{MANIFEST_NAME}.4242-0badcafe.tmp"
    leftover.write_bytes(b"{")
    w = write(cache, stop=5, close=False)
    assert leftover.exists()
    w.abort()
    write(cache)
    assert not leftover.exists()
    assert_intact(cache)


def test_unlisted_shard_names_are_ours_only_in_kdcache_form():
    ours = ["part-00000.parquet", "part-00042.parquet", "part-99999.parquet", "part-100000.parquet"]
    theirs = ["part-0.parquet", "part-12.parquet", "part-0001.parquet", "part-000001.parquet", "part-00000.parquet.bak",
              "part-00000.parquet2", "xpart-00000.parquet", "part-00000.PARQUET", "part-0000a.parquet"]
    assert all(SHARD_RE.fullmatch(n) for n in ours)
    assert not any(SHARD_RE.fullmatch(n) or is_temp_name(n) for n in theirs)


# --------------------------------------------------------------------------------------------------
# 5. Shard names in a manifest are plain file names in the cache directory


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x.parquet", "sub/part-00000.parquet", "part-0.parquet", "..",
                                 "part-00000.parquet/../../x", "", "./part-00000.parquet", "part-00001.parquet"])
def test_manifest_shard_names_outside_the_cache_are_refused(tmp_path, bad):
    cache = tmp_path / "c"
    write(cache, stop=30)
    data = json.loads((cache / MANIFEST_NAME).read_text())
    assert len(data["shards"]) >= 2
    data["shards"][0]["name"] = bad  # "part-00001.parquet": listed twice
    (cache / MANIFEST_NAME).write_text(json.dumps(data))
    before = snapshot(cache)
    for attempt in (lambda: open_cache(cache), lambda: read_manifest(cache), lambda: CacheWriter(cache, SETTINGS, SIGNALS)):
        with pytest.raises(CacheFormatError) as info:
            attempt()
        msg = one_line(info.value)
        assert str(cache / MANIFEST_NAME) in msg and repr(bad) in msg and "not written by kdcache or was edited" in msg
    assert snapshot(cache) == before and not (cache / LOCK_NAME).exists()


def test_overwrite_of_a_tampered_manifest_never_reaches_outside(tmp_path):
    victim = tmp_path / "victim.parquet"
    victim.write_bytes(b"not yours")
    cache = tmp_path / "c"
    write(cache, stop=30)
    data = json.loads((cache / MANIFEST_NAME).read_text())
    data["shards"][0]["name"] = "../victim.parquet"
    (cache / MANIFEST_NAME).write_text(json.dumps(data))
    CacheWriter(cache, SETTINGS, SIGNALS, overwrite=True).close()
    assert victim.read_bytes() == b"not yours"
    assert len(open_cache(cache)) == 0


def test_cache_lock_context_manager(tmp_path):
    with CacheLock(tmp_path, command="probe") as lock:
        assert read_lock(tmp_path)["command"] == "probe" and lock.held
        with pytest.raises(CacheLockedError):
            CacheLock(tmp_path).acquire()
    assert read_lock(tmp_path) is None


# --------------------------------------------------------------------------------------------------
# 6. Faults while taking the lock, writing the first manifest and clearing for --overwrite


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def full_disk_on_manifest_writes(monkeypatch, after: int = 0) -> list[int]:
    """ENOSPC from fsync of every manifest temporary file after the first ``after`` (the OS call fails, as on a
    full disk; the data written before it was only in the page cache). Returns the count of manifest fsyncs."""
    real_fsync = os.fsync
    seen = [0]

    def fsync(fd):
        if f".{MANIFEST_NAME}." in os.path.basename(_fd_path(fd)):
            seen[0] += 1
            if seen[0] > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_full_disk_on_the_first_manifest_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """Was: AttributeError '_pending' (the failed write aborted a writer __init__ had not finished)."""
    out = tmp_path / "new"
    full_disk_on_manifest_writes(monkeypatch)
    with pytest.raises(OutOfSpaceError) as info:
        CacheWriter(out, SETTINGS, SIGNALS, **SMALL)
    msg = one_line(info.value)
    assert "no space left" in msg and str(out) in msg
    assert not out.exists(), os.listdir(out)  # a folder this writer created: removed with everything in it
    # A folder that was there already (empty) stays, empty.
    out.mkdir()
    with pytest.raises(OutOfSpaceError):
        CacheWriter(out, SETTINGS, SIGNALS, **SMALL)
    assert os.listdir(out) == []
    monkeypatch.undo()
    write(out)
    assert_intact(out)


def test_failed_write_keeps_the_lock_until_abort(tmp_path, monkeypatch):
    """A failed shard commit does not give the lock away: the writer keeps it until abort() (or close()), so
    cleaning up after the failure never has to take it back (and never loses it to another process)."""
    cache = tmp_path / "c"
    w = CacheWriter(cache, SETTINGS, SIGNALS, **SMALL)
    full_disk_on_manifest_writes(monkeypatch, after=0)
    with pytest.raises(OutOfSpaceError) as info:
        for i in range(N_ROWS):
            w.add_row(rows(i), i + 1)  # noqa: F821
    assert "no space left" in one_line(info.value)
    assert read_lock(cache)["token"] == w._lock.token  # still ours
    with pytest.raises(CacheLockedError):
        CacheWriter(cache, SETTINGS, SIGNALS)
    w.abort(discard_new=True)
    assert not cache.exists()  # created by this writer, nothing committed: removed under the lock it still held
    monkeypatch.undo()
    write(cache)
    assert_intact(cache)


def test_crash_while_overwrite_removes_old_shards_never_leaves_a_manifest_listing_a_missing_one(tmp_path, monkeypatch):
    cache = tmp_path / "c"
    write(cache)
    old = read_manifest(cache)
    assert len(old.shards) >= 3
    real_unlink = os.unlink
    removed: list[str] = []

    def unlink(path, *a, **kw):
        name = os.path.basename(os.fspath(path))
        if SHARD_RE.fullmatch(name):
            if removed:  # the process dies (here: an I/O error) after removing the first old shard
                raise OSError(errno.EIO, "Input/output error")
            removed.append(name)
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises((KDCacheError, OSError)) as info:
        CacheWriter(cache, {**SETTINGS, "teacher": {"name": "other"}}, SIGNALS, overwrite=True, **SMALL)
    monkeypatch.undo()
    assert removed
    m = read_manifest(cache)
    missing = [s.name for s in m.shards if not (cache / s.name).is_file()]
    assert not missing, f"the manifest on disk lists deleted shards {missing}"
    assert isinstance(info.value, KDCacheError) and "Input/output error" in one_line(info.value)  # not a traceback
    assert m.settings["teacher"] == {"name": "other"} and m.status == "in_progress" and not m.shards
    assert not (cache / LOCK_NAME).exists()
    # The rerun resumes the fresh cache: the old shards left behind are strays (unlisted part-NNNNN) and go.
    write(cache, settings={**SETTINGS, "teacher": {"name": "other"}})
    assert_intact(cache)


def test_write_probe_removed_by_another_writers_cleanup_is_not_an_error(tmp_path, monkeypatch):
    """The probe is made before the lock and has a temporary name, so another writer's cleanup may remove it first."""
    import pathlib

    real_write_bytes = pathlib.Path.write_bytes

    def write_bytes(self, data):
        n = real_write_bytes(self, data)
        if self.name.startswith(".write-probe-"):
            os.remove(self)  # what another writer's _remove_strays does to our probe
        return n

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    write(tmp_path / "c")
    assert_intact(tmp_path / "c")


def test_failed_lock_write_leaves_no_lock_file(tmp_path, monkeypatch):
    cache = tmp_path / "c"
    real_write = os.write

    def write_fails(fd, data):
        if os.path.basename(_fd_path(fd)) == LOCK_NAME:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write_fails)
    with pytest.raises(OutOfSpaceError) as info:
        CacheWriter(cache, SETTINGS, SIGNALS)
    msg = one_line(info.value)
    assert "no space left" in msg and LOCK_NAME in msg
    assert not (cache / LOCK_NAME).exists()
    (tmp_path / "bare").mkdir()
    with pytest.raises(OutOfSpaceError):
        CacheLock(tmp_path / "bare").acquire()
    assert not (tmp_path / "bare" / LOCK_NAME).exists()
    monkeypatch.undo()
    write(cache)  # no empty lock file ("unreadable lock file") stands in the way of the next run
    assert_intact(cache)


def _own_start_time() -> int:
    stat = Path(f"/proc/{os.getpid()}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, starttime


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc: staleness is the pid check alone")


@needs_proc
@pytest.mark.parametrize("field", ["pid_start", "boot_id"])
def test_lock_of_an_earlier_process_with_our_pid_is_taken_over(tmp_path, field):
    """kill -9 in a container with a stable hostname: the rerun often gets the same pid (often 1). The lock
    records the process start time and the boot id, so the dead run's lock is stale even with our pid."""
    cache = tmp_path / "c"
    write(cache, stop=20, close=False).abort()
    fields = {"pid": os.getpid(), "pid_start": _own_start_time(), "boot_id": _boot_id()}
    fields[field] = _own_start_time() - 1 if field == "pid_start" else "00000000-0000-0000-0000-000000000000"
    plant_lock(cache, **fields)
    w = CacheWriter(cache, SETTINGS, SIGNALS, **SMALL)
    mine = read_lock(cache)
    assert mine["token"] == w._lock.token and mine["pid_start"] == _own_start_time() and mine["boot_id"] == _boot_id()
    for i in range(w.resume_input_row, N_ROWS):
        w.add_row(rows(i), i + 1)  # noqa: F821
    w.close()
    assert_intact(cache)


@needs_proc
def test_lock_of_this_very_process_with_another_token_is_refused(tmp_path):
    """Same pid, same start time, same boot: another writer in this process holds it."""
    cache = tmp_path / "c"
    planted = plant_lock(cache, pid=os.getpid(), pid_start=_own_start_time(), boot_id=_boot_id())
    with pytest.raises(CacheLockedError, match=f"pid {os.getpid()}") as info:
        CacheWriter(cache, SETTINGS, SIGNALS)
    assert "wait for it to finish" in one_line(info.value)
    assert (cache / LOCK_NAME).read_bytes() == planted


def test_combine_that_fails_midway_into_a_new_directory_leaves_nothing(tmp_path):
    """Sources with the same row count whose rows differ past the start: found while mixing, after the
    output's manifest and tokenizer exist. Like generate, combine removes the directory it created."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    write(a, stop=20)
    wb = CacheWriter(b, {**SETTINGS, "teacher": {"name": "second"}}, SIGNALS, **SMALL)
    for i in range(20):
        exs = rows(i)  # noqa: F821
        if i >= 10:
            exs = [{**ex, "example_id": f"other-{i}"} for ex in exs]
        wb.add_row(exs, i + 1)
    wb.close()
    (a / TOKENIZER_DIR).mkdir()
    (a / TOKENIZER_DIR / "tokenizer.json").write_text("{}")
    with pytest.raises(CacheMismatchError, match="differ at row"):
        combine_caches([a, b], [1, 1], out)
    assert not out.exists(), os.listdir(out)
    out.mkdir()  # a folder that was there already: kept, as an (empty) in-progress cache, like generate's
    with pytest.raises(CacheMismatchError, match="differ at row"):
        combine_caches([a, b], [1, 1], out)
    assert set(os.listdir(out)) == {MANIFEST_NAME, TOKENIZER_DIR} and read_manifest(out).shards == []
