"""A blob's body moved from a plain socket into its file by the kernel, and hashed
from the page cache behind it (Linux).

Received the usual way, every byte is copied out of the socket into a Python bytes
object, then from that object into the page cache, and each copy costs the CPU the
hash needs on a 2-core machine. `splice` moves the socket's bytes into a pipe
without copying them and from the pipe into the file's pages: one copy, in the
kernel, and no Python per `recv`. A hashing thread follows `HASH_WINDOW` behind:
it copies each quarter MiB out of the page cache into a small buffer and hashes it
there, in its core's cache. hashlib's sha256 runs a third slower straight from
memory, and slower still on the pages the other core has just written, so the
window keeps the hashing thread away from the copy and the bounce buffer keeps the
hash hot (docs/benchmarks.md, "Pull speed", session 26). The pages stay in the page
cache for the runner that loads the model next.

Only a body that is the blob's bytes as sent qualifies: plain HTTP (TLS bytes would
need decrypting), no Content-Encoding, a known length, not chunked. The registry
client checks that; everything else goes through `BlobWriter.write`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
from typing import Protocol

from dmr.store.pipeline import HOT_SLICE

__all__ = ["HASH_WINDOW", "SPLICE_STEP", "Pipe", "UnsupportedError", "available", "hash_window"]

SPLICE_STEP = 1 << 20  # bytes moved between two checks for a stop and a progress line
# How far the hashing thread stays behind the copy: well past a core's 2 MiB cache.
HASH_WINDOW = 16 << 20
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM})


def available() -> bool:
    return hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")


class UnsupportedError(Exception):
    """The kernel will not splice from this socket (a sandbox, an unusual socket type);
    nothing was read from it, so the caller can read it the usual way."""


class _Hasher(Protocol):
    def update(self, data: memoryview, /) -> None: ...


class Pipe:
    """A kernel pipe sized to hold a `SPLICE_STEP` (the default 64 KiB would need 16
    trips per step)."""

    def __init__(self) -> None:
        import fcntl  # here: the module is Unix's, and this one is imported everywhere

        self.read_fd, self.write_fd = os.pipe()
        with contextlib.suppress(OSError):  # capped by fs.pipe-max-size: smaller still works
            fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, SPLICE_STEP)

    def fill_from_socket(self, socket_fd: int, count: int, timeout: float) -> int:
        """Move up to `count` bytes from the socket into the pipe; 0 when the peer
        closed. Raises `TimeoutError` after `timeout` seconds without data."""
        while True:
            try:
                return os.splice(
                    socket_fd, self.write_fd, count, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
                )
            except OSError as error:
                if error.errno in _UNSUPPORTED:
                    raise UnsupportedError(f"splice refused: {error}") from error
                if not isinstance(error, BlockingIOError):
                    raise
                # Python keeps a socket with a timeout non-blocking: wait as it would.
                poller = select.poll()
                poller.register(socket_fd, select.POLLIN | select.POLLERR | select.POLLHUP)
                if not poller.poll(timeout * 1000):
                    raise TimeoutError(f"no data for {timeout:.0f} s") from None

    def drain_to_file(self, file_fd: int, offset: int, count: int) -> None:
        """Move exactly `count` bytes (already in the pipe) into the file at `offset`."""
        while count:
            moved = os.splice(
                self.read_fd, file_fd, count, offset_dst=offset, flags=os.SPLICE_F_MOVE
            )
            offset += moved
            count -= moved

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def hash_window(hasher: _Hasher, file_fd: int, start: int, end: int) -> None:
    """Hash the file's bytes from `start` to `end`, copied out of the page cache a
    quarter MiB at a time and hashed while that copy has them in this core's cache."""
    with memoryview(bytearray(HOT_SLICE)) as slot:
        while start < end:
            got = os.preadv(file_fd, [slot[: min(HOT_SLICE, end - start)]], start)
            if not got:
                raise OSError(f"the file ended at {start}, short of {end}")
            hasher.update(slot[:got])
            start += got
