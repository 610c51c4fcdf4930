"""The fast s3 subset of the fault-injection run (benchmarks/fault_injection.py --target s3), with the same engine:
caches on s3:// of a real S3 API server (moto in server mode on 127.0.0.1, started and stopped here) behind a TCP proxy
whose network is cut for real (benchmarks/fault_s3.py). Plus the regression test of the hang a cut caused.
"""

from __future__ import annotations

import random
import sys
import threading
import uuid
from pathlib import Path

import pytest

pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]'; it is in the dev extra)")
pytest.importorskip("s3fs", reason="s3fs is not installed (it is in the dev extra)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fault_engine  # noqa: E402
import fault_s3  # noqa: E402
from fault_engine import Sizes, World, kill_trial  # noqa: E402

SHORT = '{"config_kwargs": {"connect_timeout": 2, "read_timeout": 2}}'
"""Client timeouts for the cut tests (KDCACHE_STORAGE_OPTIONS, as a user would set them): 3 attempts of 2 s per
request instead of 10 s, so a cut ends a command in seconds; the defaults are measured by the benchmark."""


@pytest.fixture(scope="module")
def store():
    server = fault_s3.S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def world(store, tmp_path_factory) -> World:
    saved = dict(fault_engine.ENV)
    yield World(tmp_path_factory.mktemp("faults-s3"), Sizes(rows=100, steps=12, save_every=2), store)
    fault_engine.ENV.clear()
    fault_engine.ENV.update(saved)  # later tests' subprocesses must not look for this (stopped) server


@pytest.mark.parametrize("index,kind", [(0, "generate"), (1, "train")])
def test_a_random_kill_9_on_s3_then_the_same_command_ends_as_an_uninterrupted_run(world, index, kind):
    trial = kill_trial(world, index, kind, random.Random(2000 + index), max_kills=1)
    assert trial.kills + trial.finished_early == 1
    assert trial.resumed, trial.note
    if kind == "train":  # it read its cache from s3://
        assert str(world.reference("generate")).startswith("s3://") and trial.identical, trial.note
    else:
        assert (trial.verify_ok, trial.lost, trial.duplicated, trial.differing) == (True, 0, 0, 0), trial.note
    assert trial.ok


def test_a_network_cut_while_generate_writes_is_one_line_in_bounded_time_and_the_rerun_resumes(world, monkeypatch):
    monkeypatch.setitem(fault_engine.ENV, "KDCACHE_STORAGE_OPTIONS", SHORT)
    o = fault_s3.network_cut(world, "generate", wait_s=90)
    assert o.exit_code not in (None, 0), o.note
    assert o.seconds is not None and o.seconds < 60, o  # 3 attempts x 2 s per request, a few requests
    assert o.one_line and o.message.startswith("error: ") and "s3://" in o.message, o.message
    assert o.left_ok is True  # the committed shards verify --deep
    assert o.resumed and o.equal, o.note
    assert o.ok


def test_a_second_writer_on_an_s3_cache_is_refused_and_the_first_is_unharmed(world):
    o = fault_s3.second_writer(world)
    assert o.exit_code == 2 and o.one_line and "being written by another kdcache process" in o.message, o.message
    assert o.resumed and o.left_ok and o.equal, o.note


def test_an_upload_through_a_cut_network_fails_within_the_timeouts_instead_of_hanging(store, monkeypatch):
    """Regression: botocore sends uploads with ``Expect: 100-continue`` and aiohttp waits for the "100 Continue"
    without any timeout, so a PUT into a cut network hung forever (a cut generate never exited)."""
    from kdcache.cache import filesystem
    from kdcache.cache.filesystem import RemotePath

    monkeypatch.setenv("AWS_ENDPOINT_URL", store.client_env["AWS_ENDPOINT_URL"])  # through the proxy
    monkeypatch.setenv("KDCACHE_STORAGE_OPTIONS", '{"config_kwargs": {"read_timeout": 1, "retries": {"total_max_attempts": 1}}}')
    filesystem._filesystem.cache_clear()
    obj = RemotePath(store.url(f"cut-{uuid.uuid4().hex[:8]}", "obj"))
    obj.write_bytes(b"before")
    store.proxy.cut()
    raised: list[BaseException] = []

    def upload() -> None:
        try:
            obj.write_bytes(b"during the cut")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            raised.append(exc)

    try:
        worker = threading.Thread(target=upload, daemon=True)  # a hang must fail the test, not stall it
        worker.start()
        worker.join(timeout=15)
        assert not worker.is_alive(), "the upload into a cut network still hangs after 15 s"
        assert raised and isinstance(raised[0], OSError) and "timeout" in str(raised[0]).lower(), raised
    finally:
        store.proxy.restore()
        filesystem._filesystem.cache_clear()
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.judge_env["AWS_ENDPOINT_URL"])
    assert obj.read_bytes() == b"before"  # nothing half written


def test_the_s3_client_defaults_bound_every_request():
    """The defaults the docs promise: 3 attempts of at most 10 s read / 5 s connect, s3fs's own retry loop once."""
    from kdcache.cache.filesystem import S3_CLIENT_CONFIG, _filesystem

    assert S3_CLIENT_CONFIG == {"connect_timeout": 5, "read_timeout": 10, "retries": {"mode": "standard", "total_max_attempts": 3}}
    fs = _filesystem("s3", '{"config_kwargs": {"read_timeout": 4}}')
    assert fs.retries == 1 and fs.config_kwargs["read_timeout"] == 4 and fs.config_kwargs["connect_timeout"] == 5


def test_a_read_cut_off_by_the_network_is_not_reported_as_a_damaged_shard(world, store, monkeypatch):
    """Regression: train over a cut network stopped with "shard ... is damaged (not readable Parquet: Read timeout
    ...); run kdcache verify", sending the user to regenerate a sound cache."""
    from kdcache.cache import filesystem, open_cache
    from kdcache.errors import CacheFormatError, KDCacheError

    cache = world.reference("generate")
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.client_env["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("KDCACHE_STORAGE_OPTIONS", '{"config_kwargs": {"read_timeout": 1, "retries": {"total_max_attempts": 1}}}')
    filesystem._filesystem.cache_clear()
    opened = open_cache(cache)
    store.proxy.cut()
    try:
        with pytest.raises(KDCacheError) as got:
            list(opened)
    finally:
        store.proxy.restore()
        filesystem._filesystem.cache_clear()
    assert not isinstance(got.value, CacheFormatError), got.value
    assert "cannot read shard" in str(got.value) and "rerun the same command" in str(got.value), got.value
