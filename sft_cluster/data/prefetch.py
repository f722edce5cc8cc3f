"""Run an iterator ahead of its consumer in a background thread, through a small bounded queue.

Tokenizing and packing a window of rows takes the training step's time if done
when the step asks for its batch (``PackedDataset``). A thread is enough to take
it off the step path: the step waits on the device with the GIL released, and the
fast tokenizers encode in Rust with the GIL released too. Order is kept (one
producer, a FIFO), so what the consumer sees is exactly the synchronous sequence;
an exception in the producer is raised in the consumer, as it would have been.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")

_POLL_S = 0.1  # how often a blocked producer checks whether it was closed
# How long closing waits for the item being made; a producer stuck past it (a storage read that
# never returns) is left behind as a daemon thread rather than holding up the end of training.
_JOIN_S = 60.0

log = logging.getLogger("sft_cluster.data")
_END = object()


class Prefetcher(Generic[T]):
    """``source``'s items, produced up to ``depth`` ahead by a daemon thread.

    Close it (or exhaust it) to stop the thread; a consumer
    that drops it unclosed leaves a daemon thread parked on a full queue.
    """

    def __init__(self, source: Iterator[T], depth: int, name: str = "sft-cluster-prefetch"):
        if depth < 1:
            raise ValueError(f"a prefetch depth is at least 1, not {depth}")
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(source,), name=name, daemon=True)
        self._thread.start()

    def _produce(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(exc)
            return
        self._put(_END)

    def _put(self, item: object) -> bool:
        """Whether ``item`` was queued (False: closed while the queue was full)."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._closed.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the producer and wait for it (it finishes the item it is making first)."""
        self._closed.set()
        if self._thread is threading.current_thread():
            return
        self._thread.join(_JOIN_S)
        if self._thread.is_alive():
            log.warning("the data prefetch thread did not stop within %g s; leaving it behind", _JOIN_S)
