"""The store on disk: DMR's layout, shared blobs, tags, resume, concurrency."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import mmap
import multiprocessing
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest
from dmr.distribution.packaging import PackageOptions, package_gguf, write_to_store
from dmr.errors import ConflictError, InvalidRequestError, ModelNotFoundError, StoreError
from dmr.store import BlobWriter, Store, splice
from dmr.store.layout import digest_hex
from dmr.store.writeback import WRITEBACK_STEP

from tests.test_packaging import tiny_gguf

CREATED = "2025-01-01T00:00:00Z"


def _package(store: Store, gguf: Path, tag: str, **options: object) -> str:
    artifact = package_gguf([gguf], PackageOptions(created=CREATED, **options))  # type: ignore[arg-type]
    return write_to_store(store, artifact, [tag]).id


def test_layout_matches_dmr(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "models")
    gguf = tiny_gguf(tmp_path / "m.gguf")
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    mmproj = tiny_gguf(tmp_path / "proj.gguf", arch="clip")
    model_id = _package(store, gguf, "smollm2", chat_template=template, mmproj=mmproj)
    root = tmp_path / "models"
    assert json.loads((root / "layout.json").read_text()) == {"version": "1.0.0"}
    index = json.loads((root / "models.json").read_text())
    assert index["models"][0]["id"] == model_id
    assert index["models"][0]["tags"] == ["ai/smollm2:latest"]
    hex_id = model_id[7:]
    assert (root / "manifests" / "sha256" / hex_id).is_file()
    bundle = root / "bundles" / "sha256" / hex_id
    assert json.loads((bundle / "config.json").read_text())["format"] == "gguf"
    model_file = bundle / "model" / "model.gguf"
    assert model_file.read_bytes() == gguf.read_bytes()
    assert (bundle / "model" / "template.jinja").read_text() == "{{ messages }}"
    assert (bundle / "model" / "model.mmproj").is_file()
    blob = root / "blobs" / "sha256" / hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert blob.stat().st_ino == model_file.stat().st_ino  # a hard link, as DMR
    model = store.get("ai/smollm2")
    assert model.model_path() == model_file and model.short_id == hex_id[:12]
    assert store.get(hex_id[:12]).id == store.get(model_id).id == store.get(hex_id).id
    # A store written by DMR may have no bundle yet: it is built on first use.
    shutil.rmtree(bundle)
    assert store.get("smollm2").model_path().read_bytes() == gguf.read_bytes()


def test_delete_keeps_blobs_another_model_uses(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "models")
    gguf = tiny_gguf(tmp_path / "m.gguf")
    first = _package(store, gguf, "a/one:v1")
    second = _package(store, gguf, "a/two:v1", context_size=128)  # same weights, new config
    assert first != second
    weights = store.get(first).files[0]
    assert store.delete("a/one:v1") == [{"Untagged": "a/one:v1"}, {"Deleted": first}]
    assert store.has_blob(weights)
    assert store.get("a/two:v1").model_path().read_bytes() == gguf.read_bytes()
    store.delete("a/two:v1")
    assert not store.has_blob(weights)
    assert store.list_models() == []
    assert not list((tmp_path / "models" / "bundles" / "sha256").iterdir())


def test_tags_untag_and_forced_delete(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "models")
    model_id = _package(store, tiny_gguf(tmp_path / "m.gguf"), "a/one:v1")
    store.tag("a/one:v1", "b/two")
    assert store.get("b/two:latest").tags == ("a/one:v1", "b/two:latest")
    with pytest.raises(ConflictError):
        store.delete(model_id)
    assert store.delete("b/two") == [{"Untagged": "b/two:latest"}]
    store.tag(model_id, "c/three:x")
    report = store.delete(model_id[7:19], force=True)
    assert report[-1] == {"Deleted": model_id} and len(report) == 3
    with pytest.raises(ModelNotFoundError):
        store.get("a/one:v1")
    with pytest.raises(InvalidRequestError):
        store.get("../../etc/passwd")
    with pytest.raises(InvalidRequestError):
        store.tag(model_id, "Bad Name")


def test_moving_a_tag_drops_the_model_it_leaves_untagged(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "models")
    gguf = tiny_gguf(tmp_path / "m.gguf")
    old = _package(store, gguf, "a/m:latest")
    new = _package(store, gguf, "a/m:latest", context_size=64)
    assert [m.id for m in store.list_models()] == [new]
    assert not (tmp_path / "models" / "manifests" / "sha256" / old[7:]).exists()


def test_blob_writer_resumes_and_verifies(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "models")
    data = b"x" * 3_000_000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with store.blob_writer(digest, len(data)) as writer:
        assert writer.offset == 0
        writer.write(data[:1_000_000])  # interrupted here
    with store.blob_writer(digest, len(data)) as writer:
        assert writer.offset == 1_000_000
        writer.write(data[writer.offset :])
        writer.commit()
    assert store.blob_path(digest).read_bytes() == data
    bad = "sha256:" + "1" * 64
    with store.blob_writer(bad, 4) as writer, pytest.raises(StoreError, match="digest mismatch"):
        writer.write(b"abcd")
        writer.commit()
    assert not store.has_blob(bad)
    assert not (tmp_path / "models" / "blobs" / "sha256" / ("1" * 64 + ".incomplete")).exists()
    with pytest.raises(InvalidRequestError):
        store.blob_writer("sha256:../../etc", 1)


def test_a_blob_owns_its_disk_space_from_the_start_and_a_kept_partial_only_what_came(
    tmp_path: Path,
) -> None:
    store = Store.open(tmp_path / "models")
    data = os.urandom(24 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    partial = tmp_path / "models" / "blobs" / "sha256" / (digest_hex(digest) + ".incomplete")
    with store.blob_writer(digest, len(data)) as writer:
        writer.write(data[: 1 << 20])
        writer.write(b"")  # the writer thread has the chunk once the next call returns
        on_disk = partial.stat()
        # The whole blob is allocated (ext4, tmpfs: `fallocate`), its size what came.
        assert on_disk.st_blocks * 512 >= len(data)
        assert on_disk.st_size <= 1 << 20
    kept = partial.stat()  # interrupted: the resume needs only what was received
    assert kept.st_size == 1 << 20
    assert kept.st_blocks * 512 < 2 << 20
    with store.blob_writer(digest, len(data)) as writer:
        assert writer.offset == 1 << 20
        assert partial.stat().st_blocks * 512 >= len(data)
        writer.write(data[writer.offset :])
        writer.commit()
    blob = store.blob_path(digest)
    assert blob.read_bytes() == data
    assert blob.stat().st_blocks * 512 < len(data) + (1 << 20)  # nothing left past its end


def test_blob_writer_hashes_what_was_written_even_from_a_reused_buffer(tmp_path: Path) -> None:
    # The file and the hash are written by a thread of its own: a caller that
    # refills one buffer for every chunk must not change what it gets.
    store = Store.open(tmp_path / "models")
    chunks = [bytes([n]) * 1_000_000 for n in range(5)]
    digest = "sha256:" + hashlib.sha256(b"".join(chunks)).hexdigest()
    buffer = bytearray(1_000_000)
    with store.blob_writer(digest, 5_000_000) as writer:
        for chunk in chunks:
            buffer[:] = chunk
            writer.write(buffer)
            writer.write(memoryview(b""))  # an empty read changes nothing
        writer.commit()
    assert store.blob_path(digest).read_bytes() == b"".join(chunks)
    assert not [t for t in threading.enumerate() if t.name == "dmr-blob-write"]


class _CacheStat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]


def _cache_stat(path: Path) -> _CacheStat:
    """The file's pages in the page cache (Linux 6.5+ `cachestat`)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = _CacheStat()
        if libc.syscall(451, fd, ctypes.byref(_CacheStatRange(0, 0)), ctypes.byref(stat), 0):
            pytest.skip(f"no cachestat here: {os.strerror(ctypes.get_errno())}")
        return stat
    finally:
        os.close(fd)


def _dirty_pages(path: Path) -> int:
    return int(_cache_stat(path).dirty)


@pytest.mark.skipif(sys.platform != "linux", reason="sync_file_range and cachestat are Linux's")
def test_blob_writer_sends_pages_to_disk_while_it_writes(tmp_path: Path) -> None:
    # Left alone, the kernel would keep the whole blob dirty until the fsync before
    # the rename, and the pull would wait for all of it there.
    store = Store.open(tmp_path / "models")
    chunk = os.urandom(1 << 20)
    count = 3 * WRITEBACK_STEP // len(chunk)
    digest = "sha256:" + hashlib.sha256(chunk * count).hexdigest()
    with store.blob_writer(digest, len(chunk) * count) as writer:
        for _ in range(count):
            writer.write(chunk)
        dirty = _dirty_pages(store.layout.incomplete_blob(digest)) * mmap.PAGESIZE
        at_most = WRITEBACK_STEP + (1 << 20)  # the bytes since the last step, and a chunk
        assert dirty <= at_most, f"{dirty} of {3 * WRITEBACK_STEP} bytes still dirty"
        writer.commit()
    assert store.blob_path(digest).stat().st_size == len(chunk) * count


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(sender, receiver): a TCP connection on 127.0.0.1, as a registry's would be."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()
    receiver.settimeout(30)  # as requests leaves it: non-blocking underneath
    return sender, receiver


def _send_and_close(sender: socket.socket, data: bytes) -> threading.Thread:
    def send() -> None:
        with sender:
            sender.sendall(data)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def _receive_all(writer: BlobWriter, receiver: socket.socket, count: int) -> int:
    """Splice up to `count` bytes from `receiver` in steps, as the registry client does."""
    moved = 0
    while moved < count:
        step = writer.receive_socket(
            receiver.fileno(), min(splice.SPLICE_STEP, count - moved), 30.0
        )
        if not step:
            break
        moved += step
    return moved


needs_splice = pytest.mark.skipif(not splice.available(), reason="splice is Linux's")


@needs_splice
def test_blob_writer_takes_a_socket_body_in_the_kernel_between_written_chunks(
    tmp_path: Path,
) -> None:
    # Several hash windows and an odd tail: the hashing thread must cover every
    # spliced byte, in order with the chunks written before and after them.
    store = Store.open(tmp_path / "models")
    data = os.urandom(3 * splice.HASH_WINDOW + 12_345)
    head, body, tail = data[:1000], data[1000:-5000], data[-5000:]
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    sender, receiver = _tcp_pair()
    feeder = _send_and_close(sender, body)
    with receiver, store.blob_writer(digest, len(data)) as writer:
        writer.write(head)
        assert _receive_all(writer, receiver, len(body)) == len(body)
        writer.write(tail)
        writer.commit()
    feeder.join(30)
    blob = store.blob_path(digest)
    assert blob.read_bytes() == data
    # Moved through the page cache, not past it: the runner that loads the model
    # next finds it in memory.
    pages = -(-len(data) // mmap.PAGESIZE)
    assert _cache_stat(blob).cache >= 0.9 * pages


@needs_splice
def test_a_spliced_body_that_is_not_the_blob_is_refused(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "models")
    data = os.urandom(2 * splice.HASH_WINDOW)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    bad = bytearray(data)
    bad[splice.HASH_WINDOW + 7] ^= 0xFF
    sender, receiver = _tcp_pair()
    feeder = _send_and_close(sender, bytes(bad))
    with receiver, store.blob_writer(digest, len(data)) as writer:
        _receive_all(writer, receiver, len(data))
        with pytest.raises(StoreError, match="digest mismatch"):
            writer.commit()
    feeder.join(30)
    assert not store.has_blob(digest)
    assert not store.layout.incomplete_blob(digest).exists()


@needs_splice
def test_a_socket_body_cut_short_resumes_from_what_reached_the_file(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "models")
    data = os.urandom(3_000_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    sender, receiver = _tcp_pair()
    feeder = _send_and_close(sender, data[:2_000_000])  # then the connection drops
    with receiver, store.blob_writer(digest, len(data)) as writer:
        assert _receive_all(writer, receiver, len(data)) == 2_000_000
        assert writer.offset == 2_000_000
    feeder.join(30)
    with store.blob_writer(digest, len(data)) as writer:
        assert writer.offset == 2_000_000
        writer.write(data[2_000_000:])
        writer.commit()
    assert store.blob_path(digest).read_bytes() == data


@needs_splice
def test_a_silent_socket_times_out_and_keeps_nothing_half_done(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "models")
    data = b"x" * 10_000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    sender, receiver = _tcp_pair()
    with sender, receiver, store.blob_writer(digest, len(data)) as writer:
        with pytest.raises(TimeoutError):
            writer.receive_socket(receiver.fileno(), len(data), 0.2)
        assert writer.offset == 0
        sender.sendall(data)  # the registry wakes up: the same writer goes on
        assert _receive_all(writer, receiver, len(data)) == len(data)
        writer.commit()
    assert store.blob_path(digest).read_bytes() == data


def test_purge_refuses_a_directory_that_is_no_store(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "models")
    _package(store, tiny_gguf(tmp_path / "m.gguf"), "a/one:v1")
    store.purge()
    assert store.list_models() == [] and store.disk_usage() < 1000
    precious = tmp_path / "models" / "precious.txt"
    precious.write_text("keep me")
    (tmp_path / "models" / "layout.json").unlink()
    with pytest.raises(StoreError, match=r"layout\.json"):
        store.purge()
    assert precious.read_text() == "keep me"


def _add_in_process(root: str, gguf: str, tag: str, rounds: int) -> None:
    store = Store.open(Path(root))
    for n in range(rounds):
        artifact = package_gguf(
            [Path(gguf)], PackageOptions(created=CREATED, context_size=n % 3 + 1)
        )
        try:
            write_to_store(store, artifact, [tag])
        except StoreError as error:  # lost a blob to a concurrent delete: clean failure
            assert "missing" in str(error), error


def _check_consistent(store: Store) -> None:
    index = json.loads(store.layout.index_file.read_text())
    ids = [entry["id"] for entry in index["models"]]
    assert len(ids) == len(set(ids))
    tags = [tag for entry in index["models"] for tag in entry["tags"]]
    assert len(tags) == len(set(tags))
    for model in store.list_models():
        for digest in [*model.files, model.manifest["config"]["digest"]]:
            assert store.has_blob(digest)
        assert model.model_path().is_file()
    assert len(store.list_models()) == len(ids)


def test_concurrent_writers_and_deletes_keep_the_index_consistent(tmp_path: Path) -> None:
    root = tmp_path / "models"
    store = Store.open(root)
    gguf = tiny_gguf(tmp_path / "m.gguf")
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_add_in_process, args=(str(root), str(gguf), tag, 6))
        for tag in ("p/one:v1", "p/two:v1")
    ]
    for process in processes:
        process.start()
    errors: list[BaseException] = []

    def thread_writer() -> None:
        try:
            _add_in_process(str(root), str(gguf), "t/same:v1", 6)
        except BaseException as error:
            errors.append(error)

    def deleter() -> None:
        for _ in range(30):
            for name in ("p/one:v1", "t/same:v1"):
                with contextlib.suppress(ModelNotFoundError, StoreError):
                    store.delete(name, force=True)

    threads = [threading.Thread(target=thread_writer), threading.Thread(target=deleter)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    assert errors == []
    _check_consistent(store)
    assert store.find("p/two:v1") is not None
