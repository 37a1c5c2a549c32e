"""A blob's disk space, reserved before its bytes arrive (Linux `fallocate`).

Two reasons:
- A pull that starts can finish: once the space is the blob's, another program
  filling the disk gets the "no space" error instead of the download.
- The bytes land faster. With delayed allocation, ext4 reserves blocks a page at a
  time as the file is written and allocates them when its writeback starts
  (`writeback`), in the pull's own thread. With the extent already allocated, 2 GiB pulls
  through `bench/pull_speed.py`'s setup took 2.55 s against 2.82 s, and 2.23 s
  against 2.55 s, with 0.24-0.39 s less CPU (medians of 8 and of 10 alternating
  pairs; docs/benchmarks.md, "Session 27").

`FALLOC_FL_KEEP_SIZE` leaves the file's size at the bytes received, which a resume
reads as its offset. `posix_fallocate` is not used: where a filesystem lacks
`fallocate`, glibc emulates it by writing zeros, a second write of the whole blob.
Where the call is missing or refused the writes allocate as they go, as before.
"""

from __future__ import annotations

import ctypes
import errno
import os

from dmr.store import libc

__all__ = ["DISK_FULL", "reserve"]

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_FALLOC_FL_KEEP_SIZE = 1


def reserve(fd: int, offset: int, length: int) -> bool:
    """Allocate `length` bytes of `fd` from `offset` without changing its size; False
    where this system or filesystem cannot. Raises OSError (ENOSPC, EDQUOT, EFBIG)
    when the disk cannot hold them. Truncating the file to its size gives back what
    was reserved past it."""
    call = libc.function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if call is None or length <= 0:
        return False
    if call(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in DISK_FULL:
        raise OSError(code, os.strerror(code))
    return False  # EOPNOTSUPP, ENOSYS, EINVAL...: the writes allocate as they go
