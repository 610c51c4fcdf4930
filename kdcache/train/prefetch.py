"""Batches made ahead in a background thread, so that a train step never waits for the cache.

Reading a row group, decoding it and collating are numpy, Arrow and torch calls that release the GIL, so one
thread running ``depth`` batches ahead overlaps them with the step. What makes it safe to checkpoint:
every batch travels with the reader's state *after* it, taken in the producing thread right when the batch
is complete, so the state a checkpoint saves is the one of the last batch the step consumed, not of the
batches still waiting in the queue. A resumed run re-reads exactly those.

Anything the stream's filters ask for "the current step" (a curriculum) gets the step the batch is produced
*for* (``step_of_batch``), never the step the consumer happens to be at, so the examples drawn do not depend
on thread timing: a run with prefetch trains on the same batches as one without.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


class Prefetcher(Generic[T]):
    """``for batch, state in Prefetcher(batches, state, depth)``: ``batches`` made up to ``depth`` ahead.

    ``depth=0`` produces in the caller's thread (no thread at all): the same pairs, in the same order.
    ``transform`` runs in the producing thread on each batch (e.g. pinning host memory for CUDA copies).
    Exceptions of the producer are raised in the consumer, at the batch where they happened."""

    def __init__(self, batches: Iterator[T], state: Callable[[], Any], depth: int = 2,
                 transform: Callable[[T], T] | None = None):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._batches, self._state, self._transform = batches, state, transform or (lambda b: b)
        self.depth = depth
        self.produced = 0
        """Batches the producer has finished (the next one it makes is number ``produced``)."""
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _next_pair(self) -> tuple[T, Any]:
        batch = next(self._batches)
        pair = (self._transform(batch), self._state())
        self.produced += 1
        return pair

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                item: Any = self._next_pair()
            except StopIteration:
                item = _DONE
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is _DONE or isinstance(item, BaseException):
                return

    def __iter__(self) -> Iterator[tuple[T, Any]]:
        return self

    def __next__(self) -> tuple[T, Any]:
        if self.depth == 0:
            if self._error is not None:
                raise self._error
            try:
                return self._next_pair()
            except StopIteration:
                raise
            except BaseException as exc:
                self._error = exc  # a failed source stays failed, as with the thread
                raise
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="kdcache-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # later calls stop too
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item
        return item

    def close(self) -> None:
        """Stop the producer (it finishes the batch in hand) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

