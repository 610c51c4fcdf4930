"""The writer lock of a cache on an object store: ``CACHE/.kdcache.lock`` created by a conditional write.

An object store has no ``O_EXCL`` and no ``flock``, but it has conditional writes: a PUT with ``If-None-Match: *``
creates the object only if none exists (S3 since 2024, MinIO, GCS ``ifGenerationMatch=0``; fsspec ``mode="create"``).
Of two writers, exactly one creates the lock; the other reads it and is refused with a message naming the holder
(host, pid, start, command). The lock holds the same JSON as a local one (kdcache/cache/lock.py).

Stale locks: a holder on *this* host whose process is gone is taken over automatically, by an overwrite conditional
on the stale object's ETag (``If-Match``), so of two takers only one wins; a holder on another host cannot be checked
from here, so the user decides: ``kdcache unlock CACHE`` removes the lock (printing whom it belonged to). There is no
lease: a lock of a process killed on another machine stays until then. ``release()`` deletes the lock after re-reading
that it is still this writer's (a read then a delete: a takeover in between, by a process that found this live
writer's lock stale, cannot happen, since live holders are never taken over).
"""

from __future__ import annotations

import json

from kdcache.cache.filesystem import RemotePath
from kdcache.errors import CacheLockedError, KDCacheError


def read(path: RemotePath) -> tuple[dict | None, str | None]:
    """The lock's JSON and ETag, or (None, None) when there is no lock; an unreadable one is ``{"damaged": True}``."""
    try:
        etag = path.etag()
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    return (data if isinstance(data, dict) else {"damaged": True}), etag


def describe(root: RemotePath, holder: dict) -> str:
    lock = root / ".kdcache.lock"
    if holder.get("damaged"):
        return (f"cache {root} has an unreadable lock object {lock}; if no kdcache process is writing this cache, "
                f"run `kdcache unlock {root}` and rerun")
    who = f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('started')}: {holder.get('command')}"
    return (f"cache {root} is being written by another kdcache process ({who}); wait for it to finish; if that process is "
            f"no longer running, run `kdcache unlock {root}` (it cannot be checked from here) and rerun")


def acquire(root: RemotePath, info: dict, is_stale) -> None:
    """Create the lock or raise :class:`CacheLockedError`; ``is_stale(holder)``: a holder known to be gone."""
    path = root / ".kdcache.lock"
    data = json.dumps(info).encode()
    for _ in range(5):
        try:
            path.create(data)
            return
        except FileExistsError:
            pass
        except OSError as exc:
            raise KDCacheError(f"cannot write the lock object {path} ({' '.join(str(exc).split())}); check the bucket, "
                               "credentials and permissions, then rerun") from None
        holder, etag = read(path)
        if holder is None:
            continue  # released meanwhile: try again
        if holder.get("damaged") or not is_stale(holder):
            raise CacheLockedError(describe(root, holder))
        try:
            replaced = path.replace_if_unchanged(data, etag) if etag else False
        except NotImplementedError:
            raise CacheLockedError(describe(root, holder) + f" (the holder's process has exited, but {root.protocol}:// "
                                   "offers no conditional overwrite here, so it is not taken over automatically)") from None
        if replaced and (read(path)[0] or {}).get("token") == info["token"]:
            return
    holder, _ = read(path)
    raise CacheLockedError(describe(root, holder or {"damaged": True}))


def release(root: RemotePath, token: str) -> None:
    path = root / ".kdcache.lock"
    try:
        holder, _ = read(path)
        if holder is not None and holder.get("token") == token:
            path.unlink(missing_ok=True)
    except OSError:
        pass  # the store went away: the lock stays, and `kdcache unlock` removes it
