"""The object-store side of the fault-injection run: a real S3 API server (moto in server mode) on 127.0.0.1, with a
TCP proxy in front of it whose network can be cut, and the S3 faults (a network cut mid-run, a second writer).

Every kdcache subprocess reaches the bucket through the proxy (``AWS_ENDPOINT_URL`` in ``fault_engine.ENV``); this
process (the judge: verify, compare, copy) talks to moto directly, so a cut never blinds the judge. Cutting the proxy
is a real network cut for the client: open connections stop carrying bytes and new ones are accepted but never answered
(a black hole, like a dropped link or a firewall, which is harder on a client than a refused connection), while moto
and everything stored in it stay up, so the rerun after the network returns sees the same bucket.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time

BUCKET = "kdcache-faults"


class CuttableProxy:
    """A TCP forwarder 127.0.0.1:port -> target; ``cut()`` black-holes the link, ``restore()`` brings it back."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():  # the link is down: the connection is held open and never answered
                self._track(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for s in (client, server):
                self._track(s)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.add(s)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                while not self._up.is_set():  # cut: the bytes go nowhere until the link returns (or for good)
                    if self._closed:
                        return
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self._up.clear()

    def restore(self) -> None:
        """The link is back; connections opened or stalled during the cut are dropped (as a real outage leaves them)."""
        with self._lock:
            stale, self._sockets = self._sockets, set()
        for s in stale:
            try:
                s.close()
            except OSError:
                pass
        self._up.set()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.restore()


class S3Server:
    """moto's ThreadedMotoServer on a free loopback port, a bucket, and a :class:`CuttableProxy` in front.

    ``client_env``: what a kdcache subprocess needs to reach the bucket through the proxy; ``judge_env``: the same
    straight to moto, for this process."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.proxy = CuttableProxy(self.port)
        base = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self.judge_env = {**base, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}
        self.client_env = {**base, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.proxy.port}"}
        self._saved = {k: os.environ.get(k) for k in (*self.judge_env, "AWS_PROFILE", "KDCACHE_STORAGE_OPTIONS")}
        os.environ.update(self.judge_env)
        os.environ.pop("AWS_PROFILE", None)
        os.environ.pop("KDCACHE_STORAGE_OPTIONS", None)  # the judge talks to moto with the defaults
        _forget_clients()
        import s3fs

        s3fs.S3FileSystem(use_listings_cache=False).mkdir(BUCKET)

    def url(self, *names: str) -> str:
        return "/".join([f"s3://{BUCKET}", *names])

    def stop(self) -> None:
        self.proxy.close()
        self._server.stop()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _forget_clients()  # file systems made for this server must not serve a later one


def _forget_clients() -> None:
    import s3fs

    from kdcache.cache import filesystem

    s3fs.S3FileSystem.clear_instance_cache()
    filesystem._filesystem.cache_clear()


# ------------------------------------------------------------------------------------------ faults on the bucket
def _manifest_shards(cache) -> int:
    try:
        return len(json.loads((cache / "_manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def _logged_a_step(run_dir) -> bool:
    try:
        return (run_dir / "metrics.jsonl").stat().st_size > 0
    except OSError:
        return False


def network_cut(world, kind: str, wait_s: float = 600) -> "Outcome":
    """Cut the network to the bucket once ``kind`` is under way (generate: a shard in the manifest; train, reading an
    s3 cache: its first logged step), time how long it takes to stop, bring the network back, rerun the same
    command and compare with the reference. ``wait_s``: how long a run may take to notice before it counts as a hang."""
    from fault_engine import last_line, remove, run, start
    from fault_other import Outcome, _equal, _one_error_line, _wait_for

    ref = world.reference(kind)
    base = world.root / "faults" / f"network-cut-{kind}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    out = world.place(f"faults/network-cut-{kind}/out", kind)
    remove(out)
    cmd = world.command(kind, out)
    o = Outcome("network cut", kind)
    # train: cut as soon as it logs its first step, while it still has most of the cache to read
    committed = (lambda: _logged_a_step(out)) if kind == "train" else (lambda: _manifest_shards(out) >= 1)
    proc = start(cmd, base / "cut.log")
    try:
        if not _wait_for(committed, proc, timeout=300):
            o.note = f"the run ended before its first commit (rc {proc.wait()}); use more rows or steps"
            return o
        world.store.proxy.cut()
        t0 = time.monotonic()
        try:
            o.exit_code = proc.wait(timeout=wait_s)
            o.seconds = round(time.monotonic() - t0, 1)
        except subprocess.TimeoutExpired:
            o.note = f"HANG: still running {wait_s:.0f} s after the cut"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        world.store.proxy.restore()
    if o.exit_code == 0:
        o.note = o.note or "the run finished without noticing the cut (it needed the network no more)"
    o.one_line, o.message = _one_error_line(base / "cut.log")
    if kind != "train":
        from kdcache.cache.verify import verify_cache

        o.left_ok = verify_cache(out, deep=True).ok if (out / "_manifest.json").is_file() else None
    rc, _ = run(cmd, base / "rerun.log")
    o.resumed = rc == 0
    if o.resumed:
        o.equal, why = _equal(kind, out, ref)
        o.note = o.note or why
    else:
        o.note = o.note or f"rerun failed: {last_line(base / 'rerun.log')}"
    return o


def second_writer(world, kind: str = "generate") -> "Outcome":
    """A second identical generate into the same s3:// cache while the first holds its lock object (the first paused
    with SIGSTOP meanwhile, as in fault_other): the conditional PUT must refuse it, and the first end as the reference."""
    from fault_engine import remove
    from fault_other import Outcome, _equal, race_paused_writer

    ref = world.reference("generate")
    base = world.root / "faults" / "second-writer-s3"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    out = world.place("faults/second-writer-s3/out")
    remove(out)
    cmd = world.command("generate", out)
    o = Outcome("second writer", "generate")
    ready = lambda: (out / ".kdcache.lock").is_file() and _manifest_shards(out) >= 1  # noqa: E731
    if not race_paused_writer(o, cmd, cmd, ready, base, timeout=300):
        return o
    from kdcache.cache.verify import verify_cache

    o.left_ok = verify_cache(out, deep=True).ok
    if o.resumed:
        o.equal, why = _equal("generate", out, ref)
        o.note = o.note or why
    return o


FAULTS = {"network cut": (network_cut, ("generate", "train")), "second writer": (second_writer, ("generate",))}
"""The faults of an s3 run, each with the commands it is tried on."""


def run_faults(world, only: list[tuple[str, str]] | None = None) -> list:
    todo = only or [(fault, kind) for fault, (_, kinds) in FAULTS.items() for kind in kinds]
    return [FAULTS[fault][0](world, kind) for fault, kind in todo]
