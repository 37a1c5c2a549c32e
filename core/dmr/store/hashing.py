"""sha256 computed in a thread of its own, beside the thread that writes the bytes.

A download thread that receives, writes and hashes each chunk in turn costs the sum
of the three; hashing is the slowest (about 0.6 GB/s here, against 1 GB/s or more
for a registry on this machine and the page cache). hashlib releases the GIL on
large buffers, so a second thread hashes chunk N while the first receives and
writes chunk N+1: the pull then costs about the larger of the two, not their sum
(docs/benchmarks.md, "Pull speed").
"""

from __future__ import annotations

import hashlib
import queue
import threading

__all__ = ["BackgroundHasher"]

# Chunks waiting to be hashed: the writer blocks beyond this, so memory stays bounded
# (8 MiB for 1 MiB chunks) and a hash slower than the network paces the download.
QUEUE_DEPTH = 8


class BackgroundHasher:
    """`update()` hands a chunk to the hashing thread and returns at once; `hexdigest()`
    waits for the chunks handed so far. The thread starts with the first chunk and
    ends with `hexdigest()` or `close()`."""

    def __init__(self, depth: int = QUEUE_DEPTH) -> None:
        self._hasher = hashlib.sha256()
        self._chunks: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dmr-sha256", daemon=True)
            self._thread.start()
        self._chunks.put(_frozen(data))

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            if self._failure is None:
                try:
                    self._hasher.update(chunk)
                except BaseException as error:  # MemoryError; keep draining so no put blocks
                    self._failure = error

    def close(self) -> None:
        """Stop the thread (idempotent); the digest so far stays readable."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._chunks.put(None)
            thread.join()

    def hexdigest(self) -> str:
        self.close()
        if self._failure is not None:
            raise self._failure
        return self._hasher.hexdigest()


def _frozen(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    """`data` itself when nobody can change it before the thread hashes it, else a copy."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, memoryview) and isinstance(data.obj, bytes):
        return data
    return bytes(data)
