"""Caches on object storage: s3:// against a real S3 API server (moto in server mode) on loopback.

The server is started and stopped by the session fixture below; the client (s3fs) reaches it through the standard
``AWS_ENDPOINT_URL``, exactly as it would reach MinIO. The reference for every remote cache is the same command run
into a local folder: the shard objects must equal the local shard files byte for byte.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]'; it is in the dev extra)")
pytest.importorskip("s3fs", reason="s3fs is not installed (it is in the dev extra)")

from test_generate import make_cfg  # noqa: E402
from kdcache.cache import CacheWriter, open_cache, read_manifest  # noqa: E402
from kdcache.cache.filesystem import RemotePath  # noqa: E402
from kdcache.cache.lock import LOCK_NAME, CacheLock  # noqa: E402
from kdcache.cache.verify import verify_cache  # noqa: E402
from kdcache.cli import main  # noqa: E402
from kdcache.errors import CacheFormatError, CacheLockedError, Interrupted  # noqa: E402
from kdcache.pipeline.generate import generate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # byte-for-byte comparisons

BUCKET = "kdcache-test"
GEN = dict(top_k=8, batch_tokens=2, row_group_tokens=128, shard_tokens=256)  # several shards


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (a free port), a bucket, and the client's environment pointing at it."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("KDCACHE_STORAGE_OPTIONS", raising=False)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(use_listings_cache=False)
        fs.mkdir(BUCKET)
        yield fs
    server.stop()


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch) -> str:
    """A fresh prefix of the bucket for one test, and a private tokenizer download folder."""
    monkeypatch.setenv("KDCACHE_HOME", str(tmp_path / "kdcache-home"))
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def cfg(teacher, out, source, **kw):
    return make_cfg(teacher, out, source, data={"max_length": 64}, **{**GEN, **kw})


def objects(fs, url: str) -> dict[str, bytes]:
    """Every object under ``url`` by relative name, with its bytes."""
    root = url.removeprefix("s3://")
    return {name[len(root) + 1:]: fs.cat_file(name) for name in fs.find(root)}


def examples(path) -> list[dict]:
    return list(open_cache(path))


def assert_same_examples(a: list[dict], b: list[dict]) -> None:
    assert [x["example_id"] for x in a] == [y["example_id"] for y in b]
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for col in x:
            u, v = np.asarray(x[col]), np.asarray(y[col])
            assert (u.dtype, u.shape) == (v.dtype, v.shape) and u.tobytes() == v.tobytes(), col


@pytest.fixture(scope="module")
def local(tiny_teacher, text_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "cache"
    generate(cfg(tiny_teacher, out, text_jsonl), progress=False)
    return out


@pytest.fixture(scope="module")
def remote(s3_server, tiny_teacher, text_jsonl, tmp_path_factory) -> str:
    """The same cache as ``local``, generated straight into s3://."""
    url = f"s3://{BUCKET}/module-{uuid.uuid4().hex[:8]}/cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDCACHE_HOME", str(tmp_path_factory.mktemp("home")))
        generate(cfg(tiny_teacher, url, text_jsonl), progress=False)
    return url


def test_generate_to_s3_writes_the_local_shards_byte_for_byte(s3_server, local, remote):
    got = objects(s3_server, remote)
    m = read_manifest(remote)
    assert m.status == "complete" and len(m.shards) > 2
    for shard in read_manifest(local).shards:
        assert got[shard.name] == (local / shard.name).read_bytes(), shard.name
    assert [(s.name, s.sha256, s.row_groups) for s in m.shards] == [(s.name, s.sha256, s.row_groups) for s in read_manifest(local).shards]
    tokenizer = {n: b for n, b in got.items() if n.startswith("_tokenizer/")}
    assert tokenizer == {f"_tokenizer/{p.name}": p.read_bytes() for p in (local / "_tokenizer").iterdir()}
    assert set(got) == {s.name for s in m.shards} | set(tokenizer) | {"_manifest.json"}  # no lock, no temporary object left


def test_verify_inspect_and_reading_work_on_s3(remote, local, s3):
    assert_same_examples(examples(remote), examples(local))
    report = verify_cache(remote, deep=True)
    assert report.ok and report.rows == 64 and report.shards[0].row_groups_decoded > 0
    runner = CliRunner()
    for args in (["verify", remote, "--deep"], ["inspect", remote, "--json"]):
        result = runner.invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, (args, result.output)
    assert json.loads(result.stdout)["rows"] == 64
    rerun = runner.invoke(main, ["verify", remote], catch_exceptions=False)
    assert "ok" in rerun.stdout


def test_train_and_eval_read_an_s3_cache(remote, tmp_path, s3):
    from kdcache.train import StudentConfig, TrainConfig, train

    run = tmp_path / "run"  # the run's outputs (checkpoints, metrics) stay local
    train(TrainConfig(cache=remote, out=str(run), student=StudentConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
          intermediate_size=64), loss="kd", steps=3, batch_size=8, eval_every=0, save_every=0, device="cpu", precision="fp32"),
          progress=False)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert (run / "final").is_dir() and steps and all(np.isfinite(r.get("loss", 0.0)) for r in steps)
    result = CliRunner().invoke(main, ["eval", "--cache", remote, "--student", str(run / "final")], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_a_corrupted_object_is_detected(s3_server, remote, s3):
    m = read_manifest(remote)
    src = remote.removeprefix("s3://")
    dst = s3.removeprefix("s3://")
    for name in s3_server.find(src):
        s3_server.copy(name, dst + name[len(src):])
    target = f"{dst}/{m.shards[1].name}"
    data = bytearray(s3_server.cat_file(target))
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    s3_server.pipe_file(target, bytes(data))
    report = verify_cache(s3)
    assert [s.name for s in report.bad_shards] == [m.shards[1].name] and "sha256" in report.bad_shards[0].problems[0]
    with pytest.raises(CacheFormatError, match=rf"shard {m.shards[1].name}.* is damaged"):
        list(open_cache(s3))
    result = CliRunner().invoke(main, ["verify", s3], catch_exceptions=False)
    assert result.exit_code == 2 and m.shards[1].name in result.stderr


def test_an_interrupted_generate_resumes_on_s3(s3_server, tiny_teacher, text_jsonl, local, s3, monkeypatch):
    real = CacheWriter.add_row
    calls: list[int] = []

    def dies_after_seven_rows(self, examples, input_rows_end):
        calls.append(input_rows_end)
        if len(calls) > 7:
            raise KeyboardInterrupt  # as Ctrl-C or a scheduler's SIGTERM in the CLI
        return real(self, examples, input_rows_end)

    monkeypatch.setattr(CacheWriter, "add_row", dies_after_seven_rows)
    with pytest.raises(Interrupted, match=r"kept \d+ shards? .*; rerun the same command to resume"):
        generate(cfg(tiny_teacher, s3, text_jsonl, commit_seconds=1e-6), progress=False)
    kept = read_manifest(s3)
    assert kept.status == "in_progress" and kept.shards
    names = set(objects(s3_server, s3))
    assert {n for n in names if n.endswith(".parquet")} == {s.name for s in kept.shards}  # the in-flight upload left nothing
    assert LOCK_NAME not in names
    # as if runs died after a shard's PUT, before the manifest listed it: the next index, and one past the end
    for index in (len(kept.shards), 90):
        s3_server.pipe_file(f"{s3.removeprefix('s3://')}/part-{index:05d}.parquet", b"not parquet")
    monkeypatch.setattr(CacheWriter, "add_row", real)
    generate(cfg(tiny_teacher, s3, text_jsonl, commit_seconds=1e-6), progress=False)
    m = read_manifest(s3)
    assert m.status == "complete" and m.shards[: len(kept.shards)] == kept.shards
    assert {n for n in objects(s3_server, s3) if n.endswith(".parquet")} == {s.name for s in m.shards}  # strays removed
    assert verify_cache(s3, deep=True).ok
    assert_same_examples(examples(s3), examples(local))


def test_a_stop_before_any_commit_leaves_no_object(s3_server, tiny_teacher, text_jsonl, s3, monkeypatch):
    """Row groups already uploaded into a shard that was never completed (a multipart upload or a buffer) leave
    nothing: the upload is aborted, and the manifest and tokenizer this run created are removed under its lock."""
    real = CacheWriter.add_row
    calls: list[int] = []

    def dies_after_twenty_rows(self, examples, input_rows_end):
        calls.append(input_rows_end)
        if len(calls) > 20:
            assert self._shard is not None and self._shard_row_groups  # a shard is open, with row groups in it
            raise KeyboardInterrupt
        return real(self, examples, input_rows_end)

    monkeypatch.setattr(CacheWriter, "add_row", dies_after_twenty_rows)
    with pytest.raises(Interrupted, match="nothing was committed yet"):
        generate(cfg(tiny_teacher, s3, text_jsonl, row_group_tokens=16, shard_tokens=10**6, commit_seconds=3600), progress=False)
    assert objects(s3_server, s3) == {}


def test_two_writers_are_refused_and_a_stale_lock_is_taken_explicitly(s3_server, tiny_teacher, text_jsonl, s3):
    with CacheLock(s3, command="kdcache generate --out elsewhere"):
        with pytest.raises(CacheLockedError, match=r"being written by another kdcache process .*kdcache generate --out elsewhere"):
            generate(cfg(tiny_teacher, s3, text_jsonl), progress=False)
        with pytest.raises(CacheLockedError):
            CacheLock(s3).acquire()
    assert not RemotePath(s3 + "/" + LOCK_NAME).exists()  # released
    # A writer on another machine that was killed: its lock cannot be checked from here, so it is refused until the
    # user removes it with `kdcache unlock`.
    holder = {"host": "gpu-node-17", "pid": 4242, "started": "2026-12-01T00:00:00+00:00", "command": "kdcache generate", "token": "ab"}
    RemotePath(s3 + "/" + LOCK_NAME).write_bytes(json.dumps(holder).encode())
    with pytest.raises(CacheLockedError, match=r"host gpu-node-17, pid 4242.*kdcache unlock"):
        CacheLock(s3).acquire()
    result = CliRunner().invoke(main, ["unlock", s3], catch_exceptions=False)
    assert result.exit_code == 0 and "host gpu-node-17, pid 4242" in result.stdout
    with CacheLock(s3):
        pass
    # A lock of this host whose process is gone is taken over (conditional overwrite on its ETag).
    dead = {**holder, "host": socket.gethostname(), "pid": 2**22 + 12345, "token": "cd"}
    RemotePath(s3 + "/" + LOCK_NAME).write_bytes(json.dumps(dead).encode())
    lock = CacheLock(s3).acquire()
    assert json.loads(RemotePath(s3 + "/" + LOCK_NAME).read_text())["token"] == lock.token
    lock.release()
    assert not RemotePath(s3 + "/" + LOCK_NAME).exists()


def test_unlock_removes_a_local_lock_too(tmp_path):
    holder = {"host": "gpu-node-17", "pid": 4242, "started": "2026-12-01T00:00:00+00:00", "command": "kdcache generate", "token": "ab"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
    with pytest.raises(CacheLockedError, match="host gpu-node-17"):
        CacheLock(tmp_path).acquire()
    result = CliRunner().invoke(main, ["unlock", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0 and "pid 4242" in result.stdout and not (tmp_path / LOCK_NAME).exists()
    again = CliRunner().invoke(main, ["unlock", str(tmp_path)], catch_exceptions=False)
    assert again.exit_code == 0 and "not locked" in again.stdout


def test_merge_of_parts_on_s3(tiny_teacher, text_jsonl, local, s3):
    from kdcache.cache.merge import merge_parts

    for i in range(3):
        generate(cfg(tiny_teacher, s3, text_jsonl, num_shards=3, shard_index=i), progress=False)
    result = CliRunner().invoke(main, ["merge", "--out", s3], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    m = read_manifest(s3)
    assert m.num_rows == 64 and all("/" in s.name for s in m.shards)
    assert merge_parts(s3).shards == m.shards  # a rerun changes nothing
    merged = {ex["example_id"]: ex for ex in examples(s3)}
    single = {ex["example_id"]: ex for ex in examples(local)}
    assert_same_examples([merged[k] for k in sorted(single, key=int)], [single[k] for k in sorted(single, key=int)])
    assert verify_cache(s3, deep=True).ok


def test_combine_from_and_to_s3_equals_a_local_combine(s3_server, remote, local, s3, tmp_path):
    from kdcache.cache.combine import combine_caches

    combine_caches([remote, str(local)], [1, 3], s3, top_k=8)
    combine_caches([str(local), str(local)], [1, 3], tmp_path / "mix", top_k=8)
    got = objects(s3_server, s3)
    want = read_manifest(tmp_path / "mix")
    assert read_manifest(s3).status == "complete" and want.shards
    for shard in want.shards:
        assert got[shard.name] == (tmp_path / "mix" / shard.name).read_bytes(), shard.name
    assert any(n.startswith("_tokenizer/") for n in got)


def test_bad_storage_options_are_one_line(s3, monkeypatch):
    monkeypatch.setenv("KDCACHE_STORAGE_OPTIONS", "{not json")
    result = CliRunner().invoke(main, ["inspect", s3])
    assert result.exit_code != 0 and "KDCACHE_STORAGE_OPTIONS is not valid JSON" in result.output
    assert os.environ["KDCACHE_STORAGE_OPTIONS"] == "{not json"


def test_a_killed_generate_resumes_on_s3_and_takes_over_its_lock(s3, tmp_path):
    """A real ``kdcache generate --out s3://...`` process killed with SIGKILL after its first commit: its lock object
    stays (no cleanup ran), and the same command rerun takes it over (same host, dead pid: an If-Match overwrite) and
    resumes; the cache equals an uninterrupted local run's."""
    import signal
    import subprocess
    import time

    from conftest import _sentences, build_tiny_llama, build_tiny_tokenizer
    from test_interrupt import assert_same_rows, command

    teacher = tmp_path / "teacher"
    build_tiny_llama(teacher, build_tiny_tokenizer(teacher))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(500, seed=5)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(command(teacher, data, s3, 0.1), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if read_manifest(s3).shards:
                    break
            except CacheFormatError:
                pass
            time.sleep(0.05)
        assert proc.poll() is None, f"generate ended before its first commit: {proc.communicate()[1][-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    kept = read_manifest(s3)
    assert kept.status == "in_progress" and kept.shards
    assert RemotePath(s3 + "/" + LOCK_NAME).exists()  # left behind by the kill
    rerun = subprocess.run(command(teacher, data, s3, 0.1), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    m = read_manifest(s3)
    assert m.status == "complete" and m.shards[: len(kept.shards)] == kept.shards and not RemotePath(s3 + "/" + LOCK_NAME).exists()
    local = tmp_path / "local"
    ref = subprocess.run(command(teacher, data, local, 0.1), env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert_same_rows(s3, local)
    assert verify_cache(s3, deep=True).ok


@pytest.mark.parametrize("args", [["train", "--cache", "CACHE", "--out", "s3://kdcache-test/run"],
                                  ["export", "CACHE", "--out", "s3://kdcache-test/export"],
                                  ["import", "s3://kdcache-test/distillkit", "--out", "OUT"]])
def test_commands_that_write_local_folders_refuse_an_object_store_in_one_line(args, remote, tmp_path):
    args = [remote if a == "CACHE" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "object store" in result.output and "Traceback" not in result.output, result.output
    assert not any(p.name.startswith("s3:") for p in Path.cwd().iterdir()) and not (tmp_path / "out").exists()
