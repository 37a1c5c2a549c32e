"""A blob's bytes on their way in: received by one thread, written and hashed by another.

A download thread that receives, writes and hashes each chunk in turn costs the sum
of the three. Sockets, file writes and hashlib all release the GIL on large
buffers, so the download thread only receives and hands each chunk to a
`ChunkWorker`, whose thread writes it and then hashes it while it is still in that
core's cache (`blobs.BlobWriter._write_to_disk`). A hashing thread of its own
would read every chunk from memory again, cold, and hash about a third slower
(docs/benchmarks.md, "Pull speed"). The queue is bounded, so memory stays small and
the slower side paces the download. A body the kernel can move into the file
itself takes another way (`splice`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["HOT_SLICE", "QUEUE_DEPTH", "Chunk", "ChunkWorker", "frozen"]

# Bytes handled and then hashed at a time: small enough to stay in a core's L2 cache.
HOT_SLICE = 256 << 10
# Items waiting in a stage: the caller blocks beyond this (8 MiB for 1 MiB chunks).
QUEUE_DEPTH = 8

Chunk = bytes | memoryview
Item = TypeVar("Item")


class ChunkWorker(Generic[Item]):
    """Runs `handle(item)` for each item `put` in a thread of its own, in order.

    The thread starts with the first item and ends with `close()`; a later `put`
    starts a new one. The first error `handle` raises is kept in `failure` for the
    caller to check; the items after it are dropped, so `put` never blocks on a
    stage that failed.
    """

    def __init__(self, handle: Callable[[Item], object], name: str) -> None:
        self._handle = handle
        self._name = name
        self._items: queue.Queue[tuple[Item] | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    def put(self, item: Item) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._items.put((item,))

    def _run(self) -> None:
        while (boxed := self._items.get()) is not None:
            if self.failure is None:
                try:
                    self._handle(boxed[0])
                except BaseException as error:  # kept for the caller; keep draining
                    self.failure = error

    def close(self) -> None:
        """Wait for the items put so far and stop the thread (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._items.put(None)
            thread.join()


def frozen(data: bytes | bytearray | memoryview) -> Chunk:
    """`data` itself when nobody can change it before a thread uses it, else a copy."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, memoryview) and isinstance(data.obj, bytes):
        return data
    return bytes(data)
