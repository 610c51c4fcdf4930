"""A cache writer driven from its own thread, so the teacher never waits for encoding, zstd or fsync.

The teacher's loop hands each input row's examples over and goes on with the next forward; one worker thread
runs the :class:`CacheWriter` calls in the order they were made (encode, compress, write, fsync, commit). The
queue is bounded (``depth`` calls), so a writer slower than the teacher holds the teacher back instead of
holding the whole dataset in memory. Every call of the writer happens in the worker, so the writer itself
stays single-threaded and keeps every guarantee it has (commits between input rows, manifest last).

What is queued is work in flight: a kill loses it and a rerun resumes after the last commit, as it would
lose the writer's own buffer. An error in the worker (a full disk, say) is raised in the teacher's thread at
its next call, and nothing queued after it runs.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

from kdcache.cache.manifest import Manifest
from kdcache.cache.writer import CacheWriter


class BackgroundWriter:
    """``add_row`` / ``count`` / ``close`` / ``abort`` of a :class:`CacheWriter`, the first two queued.

    ``depth=0`` calls the writer directly (no thread). Reading ``stats``, ``rows_added`` or ``manifest``
    waits for the queue first, so they are what the writer has after every call made so far."""

    def __init__(self, writer: CacheWriter, depth: int = 8):
        if depth < 0:
            raise ValueError(f"writer queue depth must be >= 0, got {depth}")
        self.writer = writer
        self.depth = depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kdcache-writer") if depth else None
        self._slots = threading.BoundedSemaphore(max(depth, 1))
        self._queued: deque[Future] = deque()
        self._failed: BaseException | None = None

    # ------------------------------------------------------------------ the writer's calls
    def add_row(self, examples: Sequence[Mapping[str, Any]], input_rows_end: int) -> None:
        self._call(self.writer.add_row, examples, input_rows_end)

    def count(self, key: str, n: int = 1) -> None:
        self._call(self.writer.count, key, n)

    def close(self) -> Manifest:
        self.drain()
        self._shutdown()
        return self.writer.close()

    def abort(self, discard_new: bool = False) -> None:
        """Drop what is queued (work in flight), wait for the call in hand, then abort the writer."""
        for fut in self._queued:
            fut.cancel()
        self._shutdown()
        self.writer.abort(discard_new=discard_new)

    # ------------------------------------------------------------------ what the caller reads
    @property
    def resume_input_row(self) -> int:
        self.drain()
        return self.writer.resume_input_row

    @property
    def stats(self) -> dict:
        self.drain()
        return self.writer.stats

    @property
    def rows_added(self) -> int:
        self.drain()
        return self.writer.rows_added

    @property
    def manifest(self) -> Manifest:
        self.drain()
        return self.writer.manifest

    # ------------------------------------------------------------------ internals
    def drain(self) -> None:
        """Wait until every queued call has run; raise the first error one of them raised."""
        while self._queued:
            self._queued[0].exception()  # waits
            self._reap()
        self._raise_failed()

    def _call(self, fn: Callable, *args: Any) -> None:
        self._reap()
        self._raise_failed()
        if self._pool is None:
            fn(*args)
            return
        self._slots.acquire()  # blocks while `depth` calls wait: memory stays bounded
        try:
            fut = self._pool.submit(self._guarded, fn, *args)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _: self._slots.release())
        self._queued.append(fut)

    def _guarded(self, fn: Callable, *args: Any) -> None:
        if self._failed is None:  # after a failure nothing more is written
            try:
                fn(*args)
            except BaseException as exc:
                self._failed = exc
                raise

    def _reap(self) -> None:
        while self._queued and self._queued[0].done():
            self._queued.popleft()

    def _raise_failed(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._queued.clear()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
