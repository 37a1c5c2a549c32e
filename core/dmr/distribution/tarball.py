"""Model tarballs (`GET /models/{name}/export`, `POST /models/load`), DMR's layout:
`blobs/sha256/<hex>` per blob and `manifest.json` (the raw OCI manifest).

Writing is a generator of bytes (streamed, never held whole); reading is a push
parser fed chunk by chunk, written straight into verified blobs, that accepts
only those entries, so `..`, absolute paths, links and devices are refused.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

from dmr.errors import InvalidRequestError
from dmr.store.artifact import config_descriptor, layers_of, parse_manifest
from dmr.store.blobs import CHUNK
from dmr.store.layout import digest_hex, is_digest

if TYPE_CHECKING:
    from dmr.store import Store, StoredModel

__all__ = ["TarLoader", "iter_artifact_tar", "iter_model_tar", "iter_tar", "write_model_tar"]

BLOCK = 512
MAX_MANIFEST = 4 * 1024 * 1024


@dataclass(frozen=True)
class TarMember:
    name: str
    size: int
    open: Callable[[], BinaryIO] | None  # None: a directory


def _header(name: str, size: int, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.mode = 0o755 if directory else 0o644
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def iter_tar(members: Iterable[TarMember]) -> Iterator[bytes]:
    for member in members:
        if member.open is None:
            yield _header(member.name, 0, directory=True)
            continue
        yield _header(member.name, member.size)
        written = 0
        with member.open() as handle:
            while written < member.size:
                chunk = handle.read(min(CHUNK, member.size - written))
                if not chunk:
                    raise OSError(f"{member.name} shrank while it was being archived")
                written += len(chunk)
                yield chunk
        if member.size % BLOCK:
            yield b"\0" * (BLOCK - member.size % BLOCK)
    yield b"\0" * (BLOCK * 2)


def _opener(path: Path) -> Callable[[], BinaryIO]:
    return lambda: path.open("rb")


def _bytes_opener(data: bytes) -> Callable[[], BinaryIO]:
    import io

    return lambda: io.BytesIO(data)


def _members(
    blobs: list[tuple[str, int, Callable[[], BinaryIO]]], manifest: bytes
) -> list[TarMember]:
    members = [TarMember("blobs", 0, None), TarMember("blobs/sha256", 0, None)]
    seen: set[str] = set()
    for digest, size, opener in blobs:
        if digest in seen:
            continue
        seen.add(digest)
        members.append(TarMember(f"blobs/sha256/{digest_hex(digest)}", size, opener))
    members.append(TarMember("manifest.json", len(manifest), _bytes_opener(manifest)))
    return members


def iter_model_tar(store: Store, model: StoredModel) -> Iterator[bytes]:
    manifest = store.manifest_bytes(model.id)
    parsed = parse_manifest(manifest)
    blobs = [
        (d.digest, d.size, _opener(store.blob_path(d.digest)))
        for d in [*layers_of(parsed), config_descriptor(parsed)]
    ]
    return iter_tar(_members(blobs, manifest))


def iter_artifact_tar(artifact: object) -> Iterator[bytes]:
    """A packaged (not yet stored) artifact as a tarball for `POST /models/load`."""
    from dmr.distribution.packaging import Artifact

    assert isinstance(artifact, Artifact)
    blobs = [(layer.digest, layer.size, _opener(layer.path)) for layer in artifact.layers]
    blobs.append((artifact.config_digest, len(artifact.config), _bytes_opener(artifact.config)))
    return iter_tar(_members(blobs, artifact.manifest))


def write_model_tar(store: Store, model: StoredModel, fileobj: IO[bytes]) -> None:
    for chunk in iter_model_tar(store, model):
        fileobj.write(chunk)


class _BlobSink:
    """One blob entry being received: a temp file hashed on the way, published only
    if its content matches the digest its name claims."""

    def __init__(self, store: Store, digest: str) -> None:
        self.store = store
        self.digest = digest
        store.layout.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=store.layout.tmp_dir, prefix="load-")
        self.path = Path(name)
        self.handle = os.fdopen(fd, "wb")
        self.hasher = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> None:
        self.handle.write(data)
        self.hasher.update(data)

    def finish(self) -> bool:
        """Publish the blob; True when it was not in the store before."""
        self.handle.close()
        actual = "sha256:" + self.hasher.hexdigest()
        if actual != self.digest:
            self.path.unlink(missing_ok=True)
            raise InvalidRequestError(
                f"tarball entry blobs/sha256/{digest_hex(self.digest)} does not match its "
                f"digest (content is {actual})"
            )
        target = self.store.layout.blob(self.digest)
        if target.exists():
            self.path.unlink(missing_ok=True)
            return False
        os.replace(self.path, target)
        return True

    def discard(self) -> None:
        self.handle.close()
        self.path.unlink(missing_ok=True)


def _field(header: bytes, start: int, length: int) -> str:
    return header[start : start + length].split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _octal(header: bytes, start: int, length: int, what: str) -> int:
    text = _field(header, start, length).strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as error:
        raise InvalidRequestError(f"invalid tarball: corrupt {what} field") from error


class TarLoader:
    """Push parser for a model tarball. `feed()` chunks, then `finish()`."""

    def __init__(self, store: Store, tags: Iterable[str] = ()) -> None:
        self.store = store
        self.tags = list(tags)
        self._buffer = bytearray()
        self._sink: _BlobSink | None = None
        self._manifest: bytearray | None = None
        self._remaining = 0  # bytes of the current entry still to come
        self._padding = 0
        self._ended = False
        self._zero_blocks = 0
        self.received: set[str] = set()
        self.created: set[str] = set()  # blobs this load added, removed again on failure
        self.manifest: bytes | None = None
        self.bytes_received = 0

    def feed(self, data: bytes) -> None:
        try:
            self.bytes_received += len(data)
            self._feed(data)
        except BaseException:
            self.abort()
            raise

    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._remaining:
                take = min(self._remaining, len(view))
                chunk = view[:take]  # no copy: the file and the hash take a view
                if self._sink is not None:
                    self._sink.write(chunk)
                elif self._manifest is not None:
                    self._manifest += chunk
                self._remaining -= take
                view = view[take:]
                if not self._remaining:
                    self._end_entry()
                continue
            if self._padding:
                take = min(self._padding, len(view))
                self._padding -= take
                view = view[take:]
                continue
            need = BLOCK - len(self._buffer)
            self._buffer += view[:need]
            view = view[need:]
            if len(self._buffer) == BLOCK:
                header = bytes(self._buffer)
                self._buffer.clear()
                self._header(header)

    def _header(self, header: bytes) -> None:
        if self._ended:
            if header.strip(b"\0"):
                raise InvalidRequestError("invalid tarball: data after the end-of-archive marker")
            return
        if not header.strip(b"\0"):
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self._ended = True
            return
        self._zero_blocks = 0
        stored = _octal(header, 148, 8, "checksum")
        actual = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != actual:
            raise InvalidRequestError("invalid tarball: header checksum mismatch")
        name = _field(header, 0, 100)
        prefix = _field(header, 345, 155) if header[257:262] == b"ustar" else ""
        if prefix:
            name = f"{prefix}/{name}"
        size = _octal(header, 124, 12, "size")
        kind = header[156:157]
        name = name.removeprefix("./")
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise InvalidRequestError(f"invalid tarball: unsafe entry name {name!r}")
        if kind == b"5":
            if name.rstrip("/") not in {"blobs", "blobs/sha256"}:
                raise InvalidRequestError(f"invalid tarball: unexpected directory {name!r}")
            return
        if kind not in (b"0", b"\0", b"7"):
            what = {b"1": "hard link", b"2": "symlink"}.get(kind, f"entry type {kind!r}")
            raise InvalidRequestError(f"invalid tarball: {what} {name!r} is not allowed")
        if name == "manifest.json":
            if size > MAX_MANIFEST:
                raise InvalidRequestError("invalid tarball: manifest.json larger than 4 MiB")
            self._manifest = bytearray()
        elif name.startswith("blobs/sha256/") and is_digest("sha256:" + name[13:]):
            digest = "sha256:" + name[13:]
            self._sink = _BlobSink(self.store, digest)
        else:
            raise InvalidRequestError(
                f"invalid tarball: unexpected entry {name!r} (only blobs/sha256/<hex> and "
                "manifest.json)"
            )
        self._remaining = size
        self._padding = (BLOCK - size % BLOCK) % BLOCK
        if size == 0:
            self._end_entry()

    def _end_entry(self) -> None:
        if self._sink is not None:
            if self._sink.finish():
                self.created.add(self._sink.digest)
            self.received.add(self._sink.digest)
            self._sink = None
        elif self._manifest is not None:
            self.manifest = bytes(self._manifest)
            self._manifest = None

    def abort(self) -> None:
        """Undo: a refused tarball leaves the store as it was."""
        if self._sink is not None:
            self._sink.discard()
            self._sink = None
        if self.created:
            self.store.remove_unused_blobs(self.created)
            self.created.clear()

    def finish(self) -> StoredModel:
        try:
            return self._finish()
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> StoredModel:
        if self._remaining or self._padding or self._sink is not None or self._buffer:
            raise InvalidRequestError("invalid tarball: truncated")
        if not self._ended:
            raise InvalidRequestError("invalid tarball: truncated (no end-of-archive marker)")
        if self.manifest is None:
            raise InvalidRequestError("invalid tarball: no manifest.json")
        manifest = parse_manifest(self.manifest)
        for descriptor in [config_descriptor(manifest), *layers_of(manifest)]:
            if not self.store.has_blob(descriptor.digest):
                raise InvalidRequestError(
                    f"invalid tarball: blob {descriptor.digest} named by the manifest is missing"
                )
        model = self.store.add_model(self.manifest, self.tags)
        self.created.clear()
        return model
