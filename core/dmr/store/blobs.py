"""Content-addressed blobs: resumable verified writers, imports and small puts."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NoReturn

from filelock import FileLock

from dmr.errors import InsufficientStorageError, StoreError
from dmr.store import reserve, splice
from dmr.store.layout import StoreLayout, digest_hex
from dmr.store.pipeline import HOT_SLICE, Chunk, ChunkWorker, frozen
from dmr.store.writeback import EarlyWriteback

__all__ = ["CHUNK", "BlobWriter", "copy_into_blobs", "hash_file", "link_or_copy", "put_bytes"]

CHUNK = 1 << 20


def hash_file(path: Path) -> tuple[str, int]:
    """(`sha256:<hex>`, size) of a file, read in chunks."""
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return "sha256:" + hasher.hexdigest(), size


def _publish(layout: StoreLayout, tmp: Path, digest: str) -> None:
    """Rename a fully written and verified temp file into place (first one wins)."""
    final = layout.blob(digest)
    if final.exists():
        tmp.unlink(missing_ok=True)
        return
    os.replace(tmp, final)


def copy_into_blobs(layout: StoreLayout, source: BinaryIO) -> tuple[str, int]:
    """Copy a stream into the blob store while hashing it (one pass)."""
    layout.tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=layout.tmp_dir, prefix="import-")
    tmp = Path(tmp_name)
    hasher = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK):
                hasher.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        digest = "sha256:" + hasher.hexdigest()
        _publish(layout, tmp, digest)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(error, layout, f"a blob of {size}+ bytes")
        raise
    return digest, size


def put_bytes(layout: StoreLayout, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if layout.blob(digest).exists():
        return digest
    layout.tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=layout.tmp_dir, prefix="put-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        _publish(layout, Path(tmp_name), digest)
    except BaseException as error:
        Path(tmp_name).unlink(missing_ok=True)
        _raise_if_disk_full(error, layout, f"blob {digest} ({len(data)} bytes)")
        raise
    return digest


def _raise_if_disk_full(error: BaseException, layout: StoreLayout, what: str) -> None:
    """A full disk as the store's 507 error (what it needs, where), not as an errno."""
    if isinstance(error, OSError) and error.errno in reserve.DISK_FULL:
        raise InsufficientStorageError(
            f"no space left for {what} under {layout.root}: {error.strerror}"
        ) from None


class BlobWriter:
    """Writes one blob of known digest into `<hex>.incomplete`, resuming what an
    interrupted download left there; `commit()` verifies and renames it.

    The caller's thread only hands each chunk on: a writer thread writes it to disk
    and then hashes it, a quarter MiB at a time, while the write has left it in that
    core's cache (`pipeline`). A body that comes on a plain socket can instead be
    moved into the file by the kernel (`receive_socket`), and a hashing thread hashes
    it from the page cache behind the copy (`splice`). Either way `commit()` reads
    nothing back and each byte is read from memory once. The blob's space is reserved
    on disk when the file is opened (`reserve`), and the file's writeback to disk
    starts as it grows (`writeback`), so the fsync before the rename has little left
    to do. A write that failed in a thread of its own (a full disk) is raised by the
    next `write()` or `receive_socket()`, or by `commit()`.

    A per-blob file lock keeps two pulls of the same model from appending to the
    same partial file; the second one waits and then finds the blob complete.
    """

    def __init__(self, layout: StoreLayout, digest: str, size: int) -> None:
        digest_hex(digest)  # refuse anything that is not sha256:<hex> before touching disk
        self.layout = layout
        self.digest = digest
        self.size = size
        self.final_path = layout.blob(digest)
        self.partial_path = layout.incomplete_blob(digest)
        self._lock = FileLock(str(self.partial_path) + ".lock")
        self._lock.acquire()
        # Updated by the writer thread or the hashing thread, never both at once.
        self._hasher = hashlib.sha256()
        self._disk: ChunkWorker[Chunk] = ChunkWorker(self._write_to_disk, "dmr-blob-write")
        # While bytes are spliced in: the pipe, and the thread hashing up to a file offset.
        self._pipe: splice.Pipe | None = None
        self._hashing: ChunkWorker[int] = ChunkWorker(self._hash_up_to, "dmr-blob-hash")
        self._hashed_to = 0  # the hashing thread's own count
        self._hash_queued_to = 0
        self._handle: BinaryIO | None = None
        self._writeback: EarlyWriteback | None = None
        self._on_disk = 0  # bytes in the file; the writer thread's own count
        self._reserved = False  # the rest of the blob is allocated past the file's end
        self.committed = False
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise

    def _open(self) -> None:
        if self.final_path.exists():
            # Another writer finished it while we waited for the lock.
            self.offset = self.size if self.size >= 0 else self.final_path.stat().st_size
            self.committed = True
            return
        self.layout.blobs_dir.mkdir(parents=True, exist_ok=True)
        existing = self.partial_path.stat().st_size if self.partial_path.exists() else 0
        if self.size >= 0 and existing > self.size:
            existing = 0  # longer than the blob can be: garbage, start again
        # Readable too: spliced bytes are hashed as they are read back from the page cache.
        handle = self.partial_path.open("r+b" if existing else "w+b")
        handle.truncate(existing)
        # Prime the hash with the bytes already there, so the resumed blob is
        # verified as a whole on commit.
        handle.seek(0)
        remaining = existing
        while remaining:
            chunk = handle.read(min(CHUNK, remaining))
            if not chunk:
                break
            self._hasher.update(chunk)
            remaining -= len(chunk)
        handle.seek(existing)
        self._handle = handle
        self._writeback = EarlyWriteback(handle.fileno(), existing)
        self._on_disk = self.offset = existing
        self._reserve_rest()

    def _reserve_rest(self) -> None:
        """Allocate the bytes still to come, so a disk that fills up meanwhile fails
        whoever fills it and not this download; the file's size stays what it holds."""
        assert self._handle is not None
        try:
            self._reserved = reserve.reserve(
                self._handle.fileno(), self.offset, self.size - self.offset
            )
        except OSError as error:
            self._raise_write_error(error)

    def _write_to_disk(self, chunk: Chunk) -> None:
        """In the writer thread: append `chunk`, hash it and let its writeback start."""
        if self._handle is None or self._writeback is None:
            raise StoreError(f"blob writer for {self.digest} is closed")
        view = memoryview(chunk)
        for start in range(0, len(view), HOT_SLICE):
            piece = view[start : start + HOT_SLICE]
            self._handle.write(piece)
            # Hashed right after the write read it, while it is in this core's cache.
            self._hasher.update(piece)
        self._on_disk += len(chunk)
        self._writeback.advance(self._on_disk)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.committed:
            return
        if self._handle is None:
            raise StoreError(f"blob writer for {self.digest} is closed")
        if self.size >= 0 and self.offset + len(data) > self.size:
            self.abort()
            raise StoreError(f"blob {self.digest} is larger than its declared size {self.size}")
        self._raise_disk_failure()
        if not data:
            return
        self._stop_splicing(hash_rest=True)
        self._disk.put(frozen(data))
        self.offset += len(data)

    def receive_socket(self, socket_fd: int, count: int, timeout: float) -> int:
        """Move up to `count` bytes of the blob from a plain socket into the file, in the
        kernel (`splice`); returns how many, 0 when the peer closed. Network trouble
        raises `ConnectionError` or `TimeoutError`, a full disk `InsufficientStorageError`,
        a socket the kernel will not splice from `splice.UnsupportedError`.
        """
        if self.committed:
            return 0
        if self._handle is None or self._writeback is None:
            raise StoreError(f"blob writer for {self.digest} is closed")
        if self.size >= 0:
            count = min(count, self.size - self.offset)
        if count <= 0:
            return 0
        self._raise_disk_failure()
        pipe = self._start_splicing()
        self._raise_disk_failure()  # from the chunks written before the switch
        try:
            moved = pipe.fill_from_socket(socket_fd, count, timeout)
        except (TimeoutError, splice.UnsupportedError):
            raise
        except OSError as error:
            raise ConnectionError(f"{type(error).__name__}: {error}") from error
        if not moved:
            return 0
        try:
            pipe.drain_to_file(self._handle.fileno(), self._on_disk, moved)
        except OSError as error:
            self._raise_write_error(error)
        self._on_disk += moved
        self.offset += moved
        self._writeback.advance(self._on_disk)
        if self.offset - self._hash_queued_to >= splice.HASH_WINDOW:
            self._queue_hash()
        return moved

    def _start_splicing(self) -> splice.Pipe:
        if self._pipe is None:
            assert self._handle is not None
            # The chunks handed on before are written and hashed first, in order.
            self._disk.close()
            self._handle.flush()
            self._hashed_to = self._hash_queued_to = self._on_disk
            self._pipe = splice.Pipe()
        return self._pipe

    def _stop_splicing(self, *, hash_rest: bool) -> None:
        """Go back to writing through the file object, once the spliced bytes are
        hashed (`hash_rest`; a writer that will not commit need not)."""
        if self._pipe is None:
            return
        self._pipe.close()
        self._pipe = None
        if hash_rest:
            self._queue_hash()
        self._hashing.close()
        if self._handle is not None:
            self._handle.seek(self._on_disk)

    def _queue_hash(self) -> None:
        if self.offset > self._hash_queued_to:
            self._hashing.put(self.offset)
            self._hash_queued_to = self.offset

    def _hash_up_to(self, end: int) -> None:
        """In the hashing thread: hash the spliced bytes up to file offset `end`."""
        if self._handle is None:
            raise StoreError(f"blob writer for {self.digest} is closed")
        splice.hash_window(self._hasher, self._handle.fileno(), self._hashed_to, end)
        self._hashed_to = end

    def _raise_disk_failure(self) -> None:
        """Raise what failed in the writer or the hashing thread, if anything did."""
        error = self._disk.failure or self._hashing.failure
        if error is not None:
            self._raise_write_error(error)

    def _raise_write_error(self, error: BaseException) -> NoReturn:
        if not (isinstance(error, OSError) and error.errno in reserve.DISK_FULL):
            raise error
        # A partial blob that filled the disk must not keep it full: the other
        # models (and the next pull) need that space more than a resume does.
        self.abort()
        raise InsufficientStorageError(
            f"no space left for blob {self.digest} ({self.size} bytes) under "
            f"{self.layout.root}; the partial download was removed"
        ) from None

    def commit(self) -> Path:
        """Verify the digest (and size) and move the blob into place."""
        if self.committed:
            self.close()
            return self.final_path
        if self._handle is None:
            raise StoreError(f"blob writer for {self.digest} is closed")
        self._stop_splicing(hash_rest=True)
        self._disk.close()
        self._raise_disk_failure()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None
        actual = "sha256:" + self._hasher.hexdigest()
        if actual != self.digest or (self.size >= 0 and self.offset != self.size):
            self.partial_path.unlink(missing_ok=True)
            self.close()
            raise StoreError(
                f"digest mismatch for blob {self.digest}: got {actual} "
                f"({self.offset} of {self.size} bytes); the partial download was removed"
            )
        if self.final_path.exists():
            self.partial_path.unlink(missing_ok=True)
        else:
            # A rename, not a copy: the verified file becomes the blob as it is.
            os.replace(self.partial_path, self.final_path)
        self.committed = True
        self.close()
        return self.final_path

    def abort(self) -> None:
        """Drop the partial file (a resume would be pointless)."""
        self._stop_splicing(hash_rest=False)
        self._disk.close()
        if self._handle is not None:
            with contextlib.suppress(OSError):  # closing flushes: the disk may be full
                self._handle.close()
            self._handle = None
        self.partial_path.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        """Release without committing; the partial file stays for a later resume."""
        try:
            self._stop_splicing(hash_rest=False)  # a resume hashes the file again
            self._disk.close()  # what was received is on file for a resume
            if self._handle is not None:
                handle, self._handle = self._handle, None
                if self._reserved:
                    # A partial file kept for a resume holds only what it received:
                    # ext4 frees the blocks reserved past the end on a truncate.
                    with contextlib.suppress(OSError):
                        handle.truncate(self._on_disk)
                handle.close()  # flushes, which can fail on a full disk
        finally:
            if self._lock.is_locked:
                # The lock file stays: unlinking it would let a waiter lock a stale inode.
                self._lock.release()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def ensure_free_space(layout: StoreLayout, needed: int) -> None:
    """Refuse a download the disk cannot hold before writing any of it."""
    layout.blobs_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(layout.blobs_dir).free
    if needed > free:
        raise InsufficientStorageError(
            f"not enough disk space under {layout.root}: the download needs {needed} "
            f"more bytes and {free} are free"
        )


def link_or_copy(source: Path, target: Path) -> None:
    """Hard link (DMR's bundles do), copying where the filesystem refuses links."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
