"""Faults while pulling: a registry that misbehaves, a disk that fills up, a server
killed half-way, and pulls racing deletes and tags of the same model.

Each ends with the store checked byte by byte (tests/reliability/live.py
`store_problems`): what `models.json` lists is complete and verified.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from dmr.distribution.packaging import Artifact, PackageOptions, package_gguf
from dmr.errors import InsufficientStorageError
from dmr.store import Store, reserve

from tests.fixtures.hf_hub import tiny_gguf
from tests.fixtures.server import DmrServer, start_server
from tests.reliability.fake_registry import FakeRegistry, digest_of, serve
from tests.reliability.figures import record
from tests.reliability.live import MIB, blob_files, store_problems

REPOSITORY = "tests/faulty"


def artifact(tmp: Path, name: str, payload: int) -> Artifact:
    path = tmp / f"{name}.gguf"
    path.write_bytes(tiny_gguf(name, payload))
    return package_gguf([path], PackageOptions(created="2024-01-01T00:00:00Z"))


def registry_for(art: Artifact) -> FakeRegistry:
    blobs = {layer.digest: layer.path.read_bytes() for layer in art.layers}
    blobs[art.config_digest] = art.config
    return FakeRegistry(manifest=art.manifest, blobs=blobs)


@dataclass
class PullResult:
    status: int
    ok: bool
    message: str
    seconds: float


def pull(server: DmrServer, reference: str, timeout: float = 120) -> PullResult:
    """`POST /models/create`, read to the end: refused outright, or the last progress line."""
    started = time.monotonic()
    with (
        httpx.Client(base_url=server.url, timeout=timeout) as client,
        client.stream("POST", "/models/create", json={"from": reference}) as answer,
    ):
        body = answer.read()
    seconds = round(time.monotonic() - started, 2)
    if answer.status_code != 200:
        return PullResult(answer.status_code, False, json.loads(body)["error"]["message"], seconds)
    last = json.loads(body.strip().splitlines()[-1])
    return PullResult(200, last["type"] == "success", last["message"], seconds)


def listed(server: DmrServer) -> list[str]:
    models = httpx.get(server.url + "/models", timeout=30).json()
    return [tag for model in models for tag in model["tags"]]


@pytest.fixture(scope="module")
def pull_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DmrServer]:
    server = start_server(
        tmp_path_factory.mktemp("reliability-pull"), {"INSECURE_REGISTRY": "true"}
    )
    try:
        yield server
    finally:
        server.stop()


def _absurd_manifest(art: Artifact, size: int) -> bytes:
    manifest = json.loads(art.manifest)
    manifest["layers"][0]["size"] = size
    return json.dumps(manifest).encode()


# (fault, words the error must contain, whether a partial blob may stay for a resume)
FAULTS = [
    ("dropped_connection", "kept failing", True),
    ("wrong_digest", "digest mismatch", False),
    ("manifest_declared_huge", "too large", False),
    ("manifest_endless", "larger than", False),
    ("layer_size_beyond_limit", "size", False),
    ("layer_larger_than_disk", "disk space", False),
    ("layer_path_traversal", "unsafe", False),
]

ESCAPING_FILE = b"#!/bin/sh\necho escaped\n" * 100


def _escaping_manifest(art: Artifact) -> bytes:
    """The artifact plus a config file whose layer path climbs out of the bundle."""
    manifest = json.loads(art.manifest)
    manifest["layers"].append(
        {
            "mediaType": "application/vnd.docker.ai.model.file",
            "digest": digest_of(ESCAPING_FILE),
            "size": len(ESCAPING_FILE),
            "annotations": {"org.cncf.model.filepath": "../../../../tmp/dmr-escape.sh"},
        }
    )
    return json.dumps(manifest).encode()


@pytest.mark.parametrize(("fault", "words", "partial_allowed"), FAULTS)
def test_misbehaving_registry_gives_a_clear_error_and_writes_nothing(
    pull_server: DmrServer, tmp_path: Path, fault: str, words: str, partial_allowed: bool
) -> None:
    art = artifact(tmp_path, fault, payload=2_000_000)
    registry = registry_for(art)
    if fault == "dropped_connection":
        registry.drop_blobs = True
    elif fault == "wrong_digest":
        registry.corrupt_blobs = True
    elif fault == "manifest_declared_huge":
        registry.manifest_declared_size = 512 * MIB
    elif fault == "manifest_endless":
        registry.manifest_endless = True
    elif fault == "layer_size_beyond_limit":
        registry.manifest = _absurd_manifest(art, 10**18)
    elif fault == "layer_larger_than_disk":
        registry.manifest = _absurd_manifest(art, 2 * 10**12)  # 2 TB: allowed, but no room
    elif fault == "layer_path_traversal":
        registry.manifest = _escaping_manifest(art)
        registry.blobs[digest_of(ESCAPING_FILE)] = ESCAPING_FILE
    before_blobs, _ = blob_files(pull_server.models_path)
    with serve(registry):
        result = pull(pull_server, f"{registry.host}/{REPOSITORY}:v1")
    after_blobs, partials = blob_files(pull_server.models_path)
    record(
        f"registry_fault_{fault}",
        status=result.status,
        error=result.message[:300],
        seconds=result.seconds,
        layer_gets=registry.layer_gets,
        partial_kept=bool(partials),
    )
    assert not result.ok
    assert words in result.message, result.message
    assert "Traceback" not in result.message
    assert listed(pull_server) == []
    assert after_blobs == before_blobs  # no blob completed, not even the config
    if not partial_allowed:
        assert not partials
    if fault.startswith(("manifest", "layer")):
        assert registry.layer_gets == 0  # refused from the manifest alone
    assert store_problems(pull_server.models_path) == []
    assert not Path("/tmp/dmr-escape.sh").exists()
    for partial in partials:  # the next case starts clean
        (pull_server.models_path / "blobs" / "sha256" / partial).unlink()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a disk that really fills up (needs mount rights: root here)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def reserved_bytes(models_path: Path) -> int:
    """The disk space the store's partial blobs hold, reservations included."""
    blobs = models_path / "blobs" / "sha256"
    total = 0
    for name in blob_files(models_path)[1]:
        with contextlib.suppress(FileNotFoundError):  # finished meanwhile
            total += (blobs / name).stat().st_blocks * 512
    return total


def test_disk_full_while_pulling(small_disk: Path, tmp_path: Path) -> None:
    models_path = small_disk / "models"
    keeper = artifact(tmp_path, "keeper", payload=1_000_000)
    big = artifact(tmp_path, "big", payload=12_000_000)
    huge = artifact(tmp_path, "huge", payload=30_000_000)
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    models_path.mkdir()
    server_dir.joinpath("models").symlink_to(models_path)
    server = start_server(server_dir, {"INSECURE_REGISTRY": "true"})
    filler = small_disk / "filler"
    try:
        with serve(registry_for(keeper)) as registry:
            assert pull(server, f"{registry.host}/tests/keeper:v1").ok
        keeper_tag = f"{registry.host}/tests/keeper:v1"

        # Larger than the whole disk: refused before a byte is written.
        with serve(registry_for(huge)) as registry:
            refused = pull(server, f"{registry.host}/tests/huge:v1")
            assert registry.layer_gets == 0
        assert refused.status == 507 and "disk space" in refused.message, refused

        # Fits when it starts; then something else fills the disk mid-download, all
        # but 1 MiB, far less than the rest of the blob. That space was reserved as
        # the blob's file was opened, so the pull finishes.
        slow = registry_for(big)
        slow.bytes_per_second = 4 * MIB
        with serve(slow) as registry:
            big_tag = f"{registry.host}/tests/big:v1"
            outcome: list[PullResult] = []
            puller = threading.Thread(target=lambda: outcome.append(pull(server, big_tag)))
            puller.start()
            # The partial file exists a moment before its space is reserved; the disk
            # is filled once the reservation is in place (a filler measured in between
            # would not fit once the reservation lands: a CI run under load met that).
            [layer] = big.layers
            deadline = time.monotonic() + 30
            while reserved_bytes(models_path) < layer.size and time.monotonic() < deadline:
                time.sleep(0.05)
            assert reserved_bytes(models_path) >= layer.size, "the download never started"
            with filler.open("wb") as handle:
                handle.write(b"\0" * max(shutil.disk_usage(small_disk).free - MIB, 0))
            puller.join(timeout=60)
        [finished] = outcome
        _, partials = blob_files(models_path)
        record(
            "disk_full_while_pulling",
            disk_mib=24,
            refused_upfront=f"{refused.status}: {refused.message[:120]}",
            mid_download=f"{finished.status}: {finished.message[:120]}",
            partials_left=len(partials),
        )
        assert finished.ok, finished
        assert not partials
        assert sorted(listed(server)) == sorted([keeper_tag, big_tag])
        assert store_problems(models_path) == []  # every blob is complete and verified
        cli = server.cli("ls")
        assert cli.returncode == 0 and "keeper" in cli.stdout and "big" in cli.stdout, cli.stderr
        assert server.cli("rm", big_tag).returncode == 0

        # The filler gone, the same pull works again from nothing.
        filler.unlink()
        with serve(registry_for(big)) as registry:
            assert pull(server, f"{registry.host}/tests/big:v1").ok
        assert store_problems(models_path) == []
    finally:
        server.stop()
        with contextlib.suppress(FileNotFoundError):
            filler.unlink()


def test_a_killed_pulls_reservation_is_room_for_its_resume(
    small_disk: Path, tmp_path: Path
) -> None:
    models_path = small_disk / "models"
    big = artifact(tmp_path, "big", payload=12_000_000)
    [layer] = big.layers
    data = layer.path.read_bytes()
    # What a pull killed with SIGKILL leaves: its first MiB in the partial file, and
    # the rest of the blob still reserved past the file's end.
    blobs = models_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    partial = blobs / (layer.digest.removeprefix("sha256:") + ".incomplete")
    with partial.open("wb") as handle:
        handle.write(data[:MIB])
        assert reserve.reserve(handle.fileno(), MIB, len(data) - MIB)
    filler = small_disk / "filler"
    with filler.open("wb") as handle:  # all but 1 MiB: far less than the blob's rest
        handle.write(b"\0" * max(shutil.disk_usage(small_disk).free - MIB, 0))
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server_dir.joinpath("models").symlink_to(models_path)
    server = start_server(server_dir, {"INSECURE_REGISTRY": "true"})
    try:
        with serve(registry_for(big)) as registry:
            resumed = pull(server, f"{registry.host}/tests/big:v1")
        assert resumed.ok, resumed
        # Only the rest was fetched.
        assert [r for d, r in registry.ranges if d == layer.digest] == [f"bytes={MIB}-"]
        assert store_problems(models_path) == []
    finally:
        server.stop()


def fill_up(path: Path) -> int:
    """Write `path` until the disk refuses another byte; the errno it refused with."""
    refusal = 0
    with path.open("wb", buffering=0) as handle:
        for size in (MIB, 4096, 1):
            try:
                while handle.write(b"\0" * size):
                    pass
            except OSError as error:
                refusal = error.errno
    return refusal


def test_a_blob_the_disk_cannot_hold_is_refused_as_its_file_opens(small_disk: Path) -> None:
    # The free-space check before a pull can pass while another program takes the
    # space: the reservation is then the first to find the disk full.
    store = Store.open(small_disk / "models")
    data = os.urandom(4 * MIB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with (small_disk / "filler").open("wb") as handle:
        handle.write(b"\0" * (shutil.disk_usage(small_disk).free - MIB))
    with pytest.raises(InsufficientStorageError, match="no space left"):
        store.blob_writer(digest, len(data))
    assert blob_files(small_disk / "models") == (set(), set())
    (small_disk / "filler").unlink()
    with store.blob_writer(digest, len(data)) as writer:  # the lock was let go
        writer.write(data)
        writer.commit()
    assert store.blob_path(digest).read_bytes() == data


def test_a_disk_filled_under_an_unreserved_download_fails_it_cleanly(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fake: a filesystem without `fallocate` (this tmpfs has it), where the download
    # allocates as it writes and can still find the disk full half-way.
    monkeypatch.setattr(reserve, "reserve", lambda fd, offset, length: False)
    store = Store.open(small_disk / "models")
    data = os.urandom(12 * MIB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    removed = "no space left.*the partial download was removed"
    with (
        pytest.raises(InsufficientStorageError, match=removed),
        store.blob_writer(digest, len(data)) as writer,
    ):
        writer.write(data[:MIB])
        assert fill_up(small_disk / "filler") == errno.ENOSPC
        for start in range(MIB, len(data), MIB):
            writer.write(data[start : start + MIB])
        writer.commit()
    assert blob_files(small_disk / "models") == (set(), set())  # nothing kept the disk full


def test_server_killed_mid_pull_then_restarted(tmp_path: Path) -> None:
    art = artifact(tmp_path, "interrupted", payload=8_000_000)
    layer = art.layers[0]
    registry = registry_for(art)
    registry.bytes_per_second = 2 * MIB
    with serve(registry):
        reference = f"{registry.host}/tests/interrupted:v1"
        server = start_server(tmp_path, {"INSECURE_REGISTRY": "true"})
        try:

            def background_pull() -> None:
                with contextlib.suppress(httpx.HTTPError):  # the server dies under it
                    pull(server, reference)

            puller = threading.Thread(target=background_pull)
            puller.start()
            partial = (
                server.models_path
                / "blobs"
                / "sha256"
                / (layer.digest.removeprefix("sha256:") + ".incomplete")
            )
            deadline = time.monotonic() + 30
            while (not partial.exists() or partial.stat().st_size < MIB) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.05)
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=10)
            puller.join(timeout=30)
        finally:
            server.stop()
        kept = partial.stat().st_size
        assert 0 < kept < layer.size

        registry.bytes_per_second = None
        again = start_server(tmp_path, {"INSECURE_REGISTRY": "true"})
        try:
            cli = again.cli("ls")
            assert cli.returncode == 0, cli.stderr
            assert "interrupted" not in cli.stdout  # no half model listed
            assert listed(again) == []
            assert store_problems(again.models_path) == []
            gets_before = len(registry.ranges)
            resumed = pull(again, reference)
            assert resumed.ok, resumed
            ranges = [r for d, r in registry.ranges[gets_before:] if d == layer.digest]
            record(
                "server_killed_mid_pull",
                layer_bytes=layer.size,
                partial_bytes_at_kill=kept,
                resume_ranges=ranges,
                resume_seconds=resumed.seconds,
            )
            assert ranges == [f"bytes={kept}-"]
            assert listed(again) == [reference]
            assert store_problems(again.models_path) == []
        finally:
            again.stop()


def test_concurrent_pull_delete_and_tag_keep_the_store_consistent(
    pull_server: DmrServer, tmp_path: Path
) -> None:
    art = artifact(tmp_path, "raced", payload=3_000_000)
    seconds = 12.0
    statuses: Counter[str] = Counter()
    failures: list[str] = []
    failed_pulls: list[str] = []
    with serve(registry_for(art)) as registry:
        reference = f"{registry.host}/tests/raced:v1"
        path = "/models/" + quote(reference, safe="/:")
        deadline = time.monotonic() + seconds

        def puller() -> None:
            while time.monotonic() < deadline:
                result = pull(pull_server, reference)
                statuses[f"pull {'ok' if result.ok else result.status}"] += 1
                if not result.ok:
                    failed_pulls.append(result.message[:200])

        def deleter() -> None:
            with httpx.Client(base_url=pull_server.url, timeout=60) as client:
                while time.monotonic() < deadline:
                    answer = client.delete(path, params={"force": "true"})
                    statuses[f"delete {answer.status_code}"] += 1
                    if answer.status_code >= 500:
                        failures.append(f"delete: {answer.text}")
                    time.sleep(0.02)

        def tagger(index: int) -> None:
            with httpx.Client(base_url=pull_server.url, timeout=60) as client:
                turn = 0
                while time.monotonic() < deadline:
                    turn += 1
                    answer = client.post(
                        path + "/tag", params={"repo": f"ai/alias{index}", "tag": str(turn % 3)}
                    )
                    statuses[f"tag {answer.status_code}"] += 1
                    if answer.status_code >= 500:
                        failures.append(f"tag: {answer.text}")

        workers = [threading.Thread(target=puller) for _ in range(2)]
        workers += [threading.Thread(target=deleter)]
        workers += [threading.Thread(target=tagger, args=(i,)) for i in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=seconds + 120)
        problems = store_problems(pull_server.models_path)
        record(
            "concurrent_pull_delete_tag",
            seconds=seconds,
            operations=dict(statuses),
            server_errors=len(failures),
            failed_pulls=failed_pulls[:5],
            store_problems=len(problems),
        )
        assert not failures, failures[:10]
        assert not failed_pulls, failed_pulls  # a delete racing a pull does not fail it
        assert problems == []
        # The store still works: a final pull lands whole, and every listed tag resolves.
        assert pull(pull_server, reference).ok
        assert store_problems(pull_server.models_path) == []
        for tag in listed(pull_server):
            found = httpx.get(pull_server.url + "/models/" + quote(tag, safe="/:"), timeout=30)
            assert found.status_code == 200
        cli = pull_server.cli("ls")
        assert cli.returncode == 0 and "raced" in cli.stdout
    # Clean up for the other tests on this server.
    httpx.delete(pull_server.url + path, params={"force": "true"}, timeout=30)
    for tag in listed(pull_server):
        httpx.delete(pull_server.url + "/models/" + quote(tag, safe="/:"), params={"force": "true"})
    assert digest_of(art.manifest)
