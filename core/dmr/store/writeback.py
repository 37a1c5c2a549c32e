"""Start writing a file's pages to disk while the rest of it is still arriving.

A blob is fsynced before it is renamed into place (a crash must never leave a
published blob with holes). Left to itself the kernel keeps a 2 GiB download in
dirty pages (writeback starts at `dirty_background_ratio`, 10% of memory), so the
final fsync then writes it all while the pull waits: 0.3 s per GiB on this
machine's disk. `sync_file_range(SYNC_FILE_RANGE_WRITE)` queues the pages written
so far for writeback without waiting for them, so the disk works beside the
download and the final fsync finds almost nothing left (docs/benchmarks.md,
"Pull speed"). The page cache keeps the pages, so the runner that loads the model
next still reads them from memory.

Linux only (glibc's `sync_file_range`, reached through ctypes: the os module has no
binding); elsewhere, or where the call fails, the fsync does all the work as before.
"""

from __future__ import annotations

import ctypes

from dmr.store import libc

__all__ = ["WRITEBACK_STEP", "EarlyWriteback"]

WRITEBACK_STEP = 32 << 20  # bytes written between two writeback requests
_SYNC_FILE_RANGE_WRITE = 2


class EarlyWriteback:
    """Asks the kernel to write `fd`'s pages every `WRITEBACK_STEP` bytes."""

    def __init__(self, fd: int, offset: int) -> None:
        self._fd = fd
        self._queued_to = offset
        self._call = libc.function(
            "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
        )

    def advance(self, offset: int) -> None:
        """The file now holds bytes up to `offset`."""
        if self._call is None or offset - self._queued_to < WRITEBACK_STEP:
            return
        if self._call(self._fd, self._queued_to, offset - self._queued_to, _SYNC_FILE_RANGE_WRITE):
            self._call = None  # refused (a filesystem without it): leave it to the fsync
            return
        self._queued_to = offset
