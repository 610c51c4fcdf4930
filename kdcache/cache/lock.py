"""One writer per cache: a lock file, ``CACHE/.kdcache.lock``, taken by everything that writes a cache.

The lock is created atomically (``O_CREAT | O_EXCL``) and holds JSON ``{host, pid, pid_start, boot_id,
started, command, token}``. A second writer fails at once with a message naming the holder. A lock whose
process is gone *on this host* is taken over: its pid does not exist (``os.kill(pid, 0)``), or (Linux) a
process with that pid exists but started at another time (``/proc/<pid>/stat`` field 22) or in another
boot (``/proc/sys/kernel/random/boot_id``) than the recorded ones. That is what makes a ``kill -9``'d run in
a container (stable hostname, and the rerun often gets the same pid, often 1) find its lock stale rather
than "held by a live process" forever. Without ``/proc`` (or for a lock written without these fields) only
the pid is checked. A lock of this very process (same pid and start time) with another token is refused:
two writers in one process. The takeover is serialised by ``flock`` on the stale lock file, the stale file
is replaced atomically (``os.replace``) and re-read to confirm the new owner. A lock of another host is never
taken over: its process cannot be checked from here, so the user decides. The lock is released by
``release()`` (also on garbage collection of the lock object); a ``kill -9`` leaves it behind, and the next
writer on the same host takes it over.

On an object store (``s3://``, ``gs://``) the lock is an object created by a conditional write instead
(kdcache/cache/object_lock.py), with the same JSON and the same rules; ``unlock()`` (``kdcache unlock``) is the
explicit way past a holder that cannot be checked from here.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shlex
import socket
import sys
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path

from kdcache.cache.object_lock import acquire as acquire_object, read as read_object, release as release_object
from kdcache.cache.filesystem import RemotePath, as_path, is_remote
from kdcache.cache.manifest import write_atomic
from kdcache.errors import CacheLockedError, KDCacheError, OutOfSpaceError

try:
    import fcntl
except ImportError:  # not POSIX: takeovers are not serialised, the re-read still catches most races
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".kdcache.lock"
_READ_RETRY_S = 1.0
"""How long a lock file may stay empty (created, not yet written) before it counts as damaged."""


_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)}


def _hostname() -> str:
    return socket.gethostname()


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or None where
    there is no /proc or no such process. Parsed after the last ``)``: the command name may hold spaces."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def boot_id() -> str | None:
    """This boot's id (Linux), or None."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def holder_alive(holder: dict) -> bool:
    """Whether the process that wrote this lock (of this host) still runs: its pid exists and, where both the
    lock and this host say, in the same boot and with the same start time (else the pid was reused)."""
    pid = int(holder["pid"])
    recorded_boot, recorded_start = holder.get("boot_id"), holder.get("pid_start")
    if recorded_boot is not None and (current := boot_id()) is not None and recorded_boot != current:
        return False  # every process of an earlier boot is gone
    if not pid_alive(pid):
        return False
    if recorded_start is not None and (current_start := process_start(pid)) is not None:
        try:
            return int(recorded_start) == current_start
        except (TypeError, ValueError):
            return True  # a damaged field: the pid check alone, as for an old lock
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (zombies count as gone)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # EPERM: it exists, it is just not ours
    except OSError as exc:
        return exc.errno != errno.ESRCH
    try:  # Linux: a zombie has exited and holds nothing
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def _read(path: Path) -> dict | None:
    """The lock's JSON, or None if it vanished; waits out a lock being written right now."""
    deadline = time.monotonic() + _READ_RETRY_S
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            text = ""
        try:
            data = json.loads(text)
            if isinstance(data, dict):
                return data
        except json.JSONDecodeError:
            pass
        if time.monotonic() > deadline:
            return {"damaged": True}
        time.sleep(0.01)


def _describe(root: Path, holder: dict) -> str:
    lock = root / LOCK_NAME
    if holder.get("damaged"):
        return (
            f"cache {root} has an unreadable lock file {lock}; if no kdcache process is writing this "
            f"cache, delete {lock} and rerun"
        )
    host, pid = holder.get("host"), holder.get("pid")
    who = f"host {host}, pid {pid}, since {holder.get('started')}: {holder.get('command')}"
    if host != _hostname():
        advice = (f"wait for it to finish; its process cannot be checked from this host, so if it is no longer running "
                  f"on {host}, delete {lock} and rerun")
    elif pid == os.getpid():
        advice = f"wait for it to finish: another writer in this same process holds it (close or abort that writer first), or delete {lock}"
    else:
        advice = (f"wait for it to finish, or stop pid {pid} (a lock left by a process that has exited is taken over "
                  f"automatically); delete {lock} only if no kdcache process is writing this cache")
    return f"cache {root} is being written by another kdcache process ({who}); {advice}"


def _write_failed(path: Path, exc: OSError) -> KDCacheError:
    if getattr(exc, "errno", None) in _SPACE_ERRNOS:
        return OutOfSpaceError(f"no space left to write the lock file {path}; free disk space and rerun the same command")
    return KDCacheError(f"cannot write the lock file {path} ({exc.strerror or exc}); check the folder's permissions and disk, then rerun")


def _release(path: str, token: str, pid: int) -> None:
    if os.getpid() != pid:  # a forked child never releases its parent's lock
        return
    if is_remote(path):
        release_object(RemotePath(path).parent, token)
        return
    p = Path(path)
    try:
        holder = json.loads(p.read_text())
    except (OSError, ValueError):
        return
    if isinstance(holder, dict) and holder.get("token") == token:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            # The folder turned read-only (or vanished) under us: the lock stays behind, and since this process is
            # about to be gone the next writer takes it over. Raising here would hide the error that brought us here.
            pass


class CacheLock:
    """The lock of the cache at ``root``; ``acquire()`` or use as a context manager."""

    def __init__(self, root: str | Path, command: str | None = None):
        self.root = as_path(root)
        self.path = self.root / LOCK_NAME
        self.command = command if command is not None else shlex.join(sys.argv)[:300]
        self.token = secrets.token_hex(8)
        self.held = False
        self._finalizer: weakref.finalize | None = None

    def _info(self) -> dict:
        return {
            "host": _hostname(),
            "pid": os.getpid(),
            "pid_start": process_start(os.getpid()),
            "boot_id": boot_id(),
            "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "command": self.command,
            "token": self.token,
        }

    def acquire(self) -> CacheLock:
        """Take the lock or raise :class:`CacheLockedError` at once; takes over a dead local holder's lock."""
        if self.held:
            return self
        if is_remote(self.root):  # a conditional PUT instead of O_EXCL (kdcache/cache/object_lock.py)
            acquire_object(self.root, self._info(), _stale)
            return self._held()
        data = json.dumps(self._info()).encode()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    continue  # released meanwhile: try again
                try:
                    alive = holder.get("damaged") or holder.get("host") != _hostname() or holder_alive(holder)
                except (KeyError, TypeError, ValueError):
                    holder, alive = {"damaged": True}, True
                if alive:
                    raise CacheLockedError(_describe(self.root, holder)) from None
                if self._take_over(holder, data):
                    return self._held()
                continue
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as exc:
                os.close(fd)
                try:  # created by us just now (O_EXCL): an empty or partial lock must not block every later run
                    os.unlink(self.path)
                except OSError:
                    pass
                raise _write_failed(self.path, exc) from None
            os.close(fd)
            return self._held()
        holder = _read(self.path) or {"damaged": True}
        raise CacheLockedError(_describe(self.root, holder))

    def _take_over(self, stale: dict, data: bytes) -> bool:
        """Replace a dead holder's lock with ours; False if it changed meanwhile (then start over)."""
        try:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except PermissionError:
                fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # one taker at a time on this host
            except OSError:
                pass  # no flock here: the re-read below still catches most races
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                return False
            if not same_file or _read(self.path) != stale:
                return False  # someone else took it over (or released it) first
            try:
                write_atomic(self.path, data)  # its temporary file is removed on failure
            except OSError as exc:
                raise _write_failed(self.path, exc) from None
        finally:
            os.close(fd)
        mine = _read(self.path)
        return mine is not None and mine.get("token") == self.token

    def _held(self) -> CacheLock:
        self.held = True
        self._finalizer = weakref.finalize(self, _release, str(self.path), self.token, os.getpid())
        return self

    def release(self) -> None:
        """Give the lock back (only if it is still ours); safe to call twice."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self.held = False

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()


def read_lock(root: str | Path) -> dict | None:
    """The current holder of ``root``'s lock, or None when it is free."""
    root = as_path(root)
    if is_remote(root):
        return read_object(root / LOCK_NAME)[0]
    path = root / LOCK_NAME
    return _read(path) if path.exists() else None


def _stale(holder: dict) -> bool:
    """A lock of this host whose process is gone (the only kind taken over without the user)."""
    try:
        return holder.get("host") == _hostname() and not holder_alive(holder)
    except (KeyError, TypeError, ValueError):
        return False


def unlock(root: str | Path) -> dict | None:
    """``kdcache unlock``: remove the lock of ``root`` whoever holds it, for a holder the user knows is gone (a
    process killed on another machine). Returns the holder it removed (None: there was no lock)."""
    root = as_path(root)
    holder = read_lock(root)
    if holder is not None:
        (root / LOCK_NAME).unlink(missing_ok=True)
    return holder
