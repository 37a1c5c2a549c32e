"""A blob's bytes on their way in: received, written and hashed by three threads.

A download thread that receives, writes and hashes each chunk in turn costs the sum
of the three; each is about as heavy as the others here (the hash about 1.4 GB/s
with SHA-NI, a write into the page cache about as fast, a receive through requests
a little faster). Sockets, file writes and hashlib all release the GIL on large
buffers, so the download thread only receives and hands each chunk to a writer
thread and a hashing thread: the pull then costs about the slowest of the three, not
their sum (docs/benchmarks.md, "Pull speed"). The queues are bounded, so memory
stays small and the slowest stage paces the download.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable

__all__ = ["QUEUE_DEPTH", "BackgroundHasher", "Chunk", "ChunkWorker"]

# Chunks waiting in a stage: the caller blocks beyond this (8 MiB for 1 MiB chunks).
QUEUE_DEPTH = 8

Chunk = bytes | memoryview


class ChunkWorker:
    """Runs `handle(chunk)` for each chunk `put` in a thread of its own, in order.

    The thread starts with the first chunk and ends with `close()`. The first error
    `handle` raises is kept in `failure` for the caller to check; the chunks after it
    are dropped, so `put` never blocks on a stage that failed.
    """

    def __init__(self, handle: Callable[[Chunk], object], name: str) -> None:
        self._handle = handle
        self._name = name
        self._chunks: queue.Queue[Chunk | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    def put(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._chunks.put(_frozen(data))

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            if self.failure is None:
                try:
                    self._handle(chunk)
                except BaseException as error:  # kept for the caller; keep draining
                    self.failure = error

    def close(self) -> None:
        """Wait for the chunks put so far and stop the thread (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._chunks.put(None)
            thread.join()


class BackgroundHasher:
    """sha256 of the chunks handed to `update`, computed by a `ChunkWorker`."""

    def __init__(self) -> None:
        self._hasher = hashlib.sha256()
        self._worker = ChunkWorker(self._hasher.update, "dmr-sha256")

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._worker.put(data)

    def close(self) -> None:
        self._worker.close()

    def hexdigest(self) -> str:
        self._worker.close()
        if self._worker.failure is not None:
            raise self._worker.failure
        return self._hasher.hexdigest()


def _frozen(data: bytes | bytearray | memoryview) -> Chunk:
    """`data` itself when nobody can change it before a thread uses it, else a copy."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, memoryview) and isinstance(data.obj, bytes):
        return data
    return bytes(data)
