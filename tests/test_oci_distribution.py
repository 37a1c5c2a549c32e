"""OCI pull and push against a real `docker-registry` on 127.0.0.1 (no server, no CLI)."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from dmr.distribution import packaging
from dmr.distribution.credentials import resolve_credentials
from dmr.distribution.packaging import PackageOptions
from dmr.distribution.progress import TransferProgress, loop_callback, run_transfer
from dmr.distribution.registry_client import RegistryAuthError
from dmr.distribution.service import pull_model, push_model
from dmr.errors import DmrError, UnsupportedMediaTypeError
from dmr.records import ProgressEvent
from dmr.store import Store, StoredModel

from tests.fixtures.file_reads import reads_under
from tests.fixtures.hf_hub import tiny_gguf
from tests.fixtures.registry import (
    LocalRegistry,
    RecordingProxy,
    upload_artifact,
)

pytestmark = pytest.mark.registry

CREATED = "2024-01-01T00:00:00Z"


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DOCKER_USERNAME", "DOCKER_PASSWORD", "DEFAULT_REGISTRY", "INSECURE_REGISTRY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MODEL_RUNNER_REGISTRY_MIRRORS", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


def local_model(store: Store, tmp_path: Path, tag: str, payload: int = 3_000_000) -> StoredModel:
    path = tmp_path / f"{abs(hash(tag))}.gguf"
    path.write_bytes(tiny_gguf(tag, payload))
    artifact = packaging.package_gguf([path], PackageOptions(created=CREATED))
    return packaging.write_to_store(store, artifact, [tag])


def weights_digest(model: StoredModel) -> tuple[str, int]:
    layer = model.manifest["layers"][0]
    return layer["digest"], layer["size"]


async def test_push_then_pull_gives_the_same_model(
    oci_registry: LocalRegistry, tmp_path: Path
) -> None:
    source = Store.open(tmp_path / "source")
    tag = f"{oci_registry.host}/tests/round-trip:v1"
    model = local_model(source, tmp_path, tag)
    pushed: list[ProgressEvent] = []
    await push_model(source, tag, pushed.append)
    assert all(e.mode == "push" for e in pushed)
    assert any(e.type == "progress" and e.layer_id for e in pushed)

    target = Store.open(tmp_path / "target")
    pulled: list[ProgressEvent] = []
    copy = await pull_model(target, tag, pulled.append)
    assert copy.id == model.id
    assert copy.tags == (tag,)
    digest, size = weights_digest(copy)
    assert target.blob_path(digest).stat().st_size == size
    layer_events = [e for e in pulled if e.layer_id == digest]
    assert layer_events[-1].layer_current == size
    assert pulled[-1].message.startswith("Downloaded: ")


async def test_round_trip_with_htpasswd_credentials(
    auth_registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_USERNAME", auth_registry.username or "")
    monkeypatch.setenv("DOCKER_PASSWORD", auth_registry.password or "")
    source = Store.open(tmp_path / "source")
    tag = f"{auth_registry.host}/tests/private:v1"
    model = local_model(source, tmp_path, tag)
    await push_model(source, tag, lambda event: None)
    copy = await pull_model(Store.open(tmp_path / "target"), tag, lambda event: None)
    assert copy.id == model.id


async def test_credentials_from_docker_config_auths(
    auth_registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    secret = base64.b64encode(f"{auth_registry.username}:{auth_registry.password}".encode())
    (config_dir / "config.json").write_text(
        json.dumps({"auths": {auth_registry.host: {"auth": secret.decode()}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    source = Store.open(tmp_path / "source")
    tag = f"{auth_registry.host}/tests/from-config:v1"
    local_model(source, tmp_path, tag)
    await push_model(source, tag, lambda event: None)
    await pull_model(Store.open(tmp_path / "target"), tag, lambda event: None)


def test_credentials_from_a_credential_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-dmrtest"
    helper.write_text(
        "#!/bin/sh\n"
        "read host\n"
        'if [ "$host" = "registry.example:5000" ]; then\n'
        '  echo \'{"ServerURL":"registry.example:5000","Username":"helper-user","Secret":"hs"}\'\n'
        "else\n  echo 'credentials not found' >&2; exit 1\nfi\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps({"credsStore": "dmrtest"}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    found = resolve_credentials("registry.example:5000")
    assert found is not None
    assert (found.username, found.password) == ("helper-user", "hs")
    assert resolve_credentials("other.example") is None
    # credHelpers beats credsStore for its registry.
    (config_dir / "config.json").write_text(
        json.dumps({"credsStore": "missing", "credHelpers": {"registry.example:5000": "dmrtest"}})
    )
    found = resolve_credentials("registry.example:5000")
    assert found is not None and found.username == "helper-user"


async def test_wrong_credentials_give_a_clear_error(
    auth_registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_USERNAME", auth_registry.username or "")
    monkeypatch.setenv("DOCKER_PASSWORD", "not-the-password")
    store = Store.open(tmp_path / "store")
    with pytest.raises(RegistryAuthError, match="refused the credentials"):
        await pull_model(store, f"{auth_registry.host}/tests/anything:v1", lambda event: None)
    monkeypatch.delenv("DOCKER_USERNAME")
    monkeypatch.delenv("DOCKER_PASSWORD")
    with pytest.raises(RegistryAuthError, match="authentication required"):
        await pull_model(store, f"{auth_registry.host}/tests/anything:v1", lambda event: None)
    assert store.list_models() == []


async def test_unknown_config_media_type_is_refused_before_any_blob(
    oci_registry: LocalRegistry, registry_proxy: RecordingProxy, tmp_path: Path
) -> None:
    upload_artifact(
        oci_registry,
        "tests/not-a-model",
        "v1",
        "application/vnd.example.thing.config.v1+json",
        b"{}",
        [("application/vnd.docker.ai.gguf.v3", b"weights")],
    )
    store = Store.open(tmp_path / "store")
    with pytest.raises(UnsupportedMediaTypeError) as caught:
        await pull_model(store, f"{registry_proxy.host}/tests/not-a-model:v1", lambda e: None)
    assert caught.value.status == 422
    assert any("/manifests/" in r.path for r in registry_proxy.requests)
    assert not [r for r in registry_proxy.requests if "/blobs/" in r.path]
    assert store.list_models() == []


async def test_corrupted_blob_is_rejected_and_store_untouched(
    oci_registry: LocalRegistry, tmp_path: Path
) -> None:
    source = Store.open(tmp_path / "source")
    tag = f"{oci_registry.host}/tests/corrupted:v1"
    model = local_model(source, tmp_path, tag)
    await push_model(source, tag, lambda event: None)
    digest, size = weights_digest(model)
    stored = oci_registry.blob_file(digest)
    data = bytearray(stored.read_bytes())
    data[size // 2] ^= 0xFF  # same size, one byte flipped
    stored.write_bytes(bytes(data))

    target = Store.open(tmp_path / "target")
    with pytest.raises(DmrError, match="digest"):
        await pull_model(target, tag, lambda event: None)
    assert target.list_models() == []
    assert not target.has_blob(digest)
    assert not target.layout.incomplete_blob(digest).exists()
    assert not target.has_blob(model.manifest["config"]["digest"])


async def test_pull_hashes_as_it_writes_and_reads_no_blob_back(
    oci_registry: LocalRegistry, tmp_path: Path
) -> None:
    source = Store.open(tmp_path / "source")
    tag = f"{oci_registry.host}/tests/read-once:v1"
    model = local_model(source, tmp_path, tag, payload=6_000_000)
    await push_model(source, tag, lambda event: None)
    digest, size = weights_digest(model)

    target = Store.open(tmp_path / "target")
    with reads_under(target.root) as reads:
        copy = await pull_model(target, tag, lambda event: None)
    assert copy.id == model.id
    blob = target.blob_path(digest).resolve()
    assert blob.read_bytes() == source.blob_path(digest).read_bytes()
    # The weights were verified while they were written: after the download only
    # their GGUF header is read (the check that it is a model), never the 6 MB again.
    assert reads[blob] < 4096, reads
    # The registry is plain HTTP, so the kernel moved the body into the file and
    # the hash read it from the page cache a window behind: each byte at most once,
    # all of it before the blob was published (reads after count against `blob`).
    partial = reads[target.layout.incomplete_blob(digest).resolve()]
    assert 0 < partial <= size, reads
    assert sum(reads.values()) < partial + 64 * 1024, reads
    # No copy either: the bundle's weights are the blob itself (a hard link).
    assert (copy.bundle_dir / "model" / "model.gguf").stat().st_ino == blob.stat().st_ino
    assert size == 6_000_000 + len(tiny_gguf(tag, 0))


async def test_a_kernel_that_refuses_splice_still_pulls(
    oci_registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fake for a sandbox whose seccomp profile refuses splice (EPERM): the body is
    # then read through requests as any TLS one is, and nothing is lost.
    source = Store.open(tmp_path / "source")
    tag = f"{oci_registry.host}/tests/no-splice:v1"
    model = local_model(source, tmp_path, tag, payload=3_000_000)
    await push_model(source, tag, lambda event: None)
    digest, _ = weights_digest(model)
    refused: list[int] = []

    def refuse(*args: object, **kwargs: object) -> int:
        refused.append(1)
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "splice", refuse)
    target = Store.open(tmp_path / "target")
    with reads_under(target.root) as reads:
        copy = await pull_model(target, tag, lambda event: None)
    assert copy.id == model.id
    assert refused, "the pull did not try splice"
    assert target.blob_path(digest).read_bytes() == source.blob_path(digest).read_bytes()
    assert reads[target.layout.incomplete_blob(digest).resolve()] == 0  # hashed as written


async def test_corrupted_partial_blob_is_refused_after_the_resume(
    oci_registry: LocalRegistry, registry_proxy: RecordingProxy, tmp_path: Path
) -> None:
    source = Store.open(tmp_path / "source")
    tag = f"{oci_registry.host}/tests/bad-partial:v1"
    model = local_model(source, tmp_path, tag, payload=4_000_000)
    await push_model(source, tag, lambda event: None)
    digest, _ = weights_digest(model)

    target = Store.open(tmp_path / "target")
    partial = target.layout.incomplete_blob(digest)
    partial.parent.mkdir(parents=True, exist_ok=True)
    kept = bytearray(source.blob_path(digest).read_bytes()[:1_500_000])
    kept[1000] ^= 0xFF  # a byte that went bad on disk before the resume
    partial.write_bytes(bytes(kept))
    with pytest.raises(DmrError, match="digest mismatch"):
        await pull_model(target, f"{registry_proxy.host}/tests/bad-partial:v1", lambda e: None)
    assert [g.range for g in registry_proxy.blob_gets(digest)] == ["bytes=1500000-"]
    assert not target.has_blob(digest)
    assert not partial.exists()
    assert target.list_models() == []
    # The next pull starts over and gets the right bytes.
    copy = await pull_model(target, tag, lambda event: None)
    assert target.blob_path(copy.files[0]).read_bytes() == source.blob_path(digest).read_bytes()


async def test_partial_blob_resumes_with_range(
    oci_registry: LocalRegistry, registry_proxy: RecordingProxy, tmp_path: Path
) -> None:
    source = Store.open(tmp_path / "source")
    tag = f"{oci_registry.host}/tests/resume:v1"
    model = local_model(source, tmp_path, tag, payload=4_000_000)
    await push_model(source, tag, lambda event: None)
    digest, size = weights_digest(model)
    already = 1_500_000

    target = Store.open(tmp_path / "target")
    partial = target.layout.incomplete_blob(digest)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(source.blob_path(digest).read_bytes()[:already])
    copy = await pull_model(target, f"{registry_proxy.host}/tests/resume:v1", lambda event: None)
    assert copy.id == model.id
    gets = registry_proxy.blob_gets(digest)
    assert [g.range for g in gets] == [f"bytes={already}-"]
    assert gets[0].bytes_sent == size - already
    assert not partial.exists()


async def test_transient_registry_errors_are_retried(
    oci_registry: LocalRegistry, registry_proxy: RecordingProxy, tmp_path: Path
) -> None:
    source = Store.open(tmp_path / "source")
    tag = f"{oci_registry.host}/tests/flaky:v1"
    model = local_model(source, tmp_path, tag)
    await push_model(source, tag, lambda event: None)
    digest, _ = weights_digest(model)

    registry_proxy.failing_blob_gets = 2
    target = Store.open(tmp_path / "target")
    copy = await pull_model(target, f"{registry_proxy.host}/tests/flaky:v1", lambda event: None)

    assert copy.id == model.id
    assert registry_proxy.failing_blob_gets == 0
    statuses = [request.status for request in registry_proxy.requests if "/blobs/" in request.path]
    assert statuses.count(503) == 2 and statuses[-1] is None
    assert target.blob_path(digest).read_bytes() == source.blob_path(digest).read_bytes()


async def test_layers_download_in_parallel(
    oci_registry: LocalRegistry, registry_proxy: RecordingProxy, tmp_path: Path
) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    for index in range(3):
        # A valid safetensors file: 8-byte header length, JSON header, tensor bytes.
        data = bytes([index]) * 400_000
        header = json.dumps(
            {"w": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}
        ).encode()
        (weights / f"model-0000{index + 1}-of-00003.safetensors").write_bytes(
            len(header).to_bytes(8, "little") + header + data
        )
    (weights / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    source = Store.open(tmp_path / "source")
    tag = f"{oci_registry.host}/tests/parallel:v1"
    artifact = packaging.package_safetensors_dir(weights, PackageOptions(created=CREATED))
    model = packaging.write_to_store(source, artifact, [tag])
    await push_model(source, tag, lambda event: None)

    registry_proxy.bytes_per_second = 1_000_000  # each weight layer takes ~0.4 s
    target = Store.open(tmp_path / "target")
    copy = await pull_model(target, f"{registry_proxy.host}/tests/parallel:v1", lambda e: None)

    assert copy.id == model.id
    assert registry_proxy.most_blob_gets_in_flight >= 2


async def test_mirror_is_tried_before_docker_hub(
    oci_registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Store.open(tmp_path / "source")
    tag = f"{oci_registry.host}/ai/mirrored-tiny:latest"
    model = local_model(source, tmp_path, tag)
    await push_model(source, tag, lambda event: None)
    # Docker Hub cannot be reached from here: only the mirror can answer.
    monkeypatch.setenv("MODEL_RUNNER_REGISTRY_MIRRORS", f"http://{oci_registry.host}")
    copy = await pull_model(Store.open(tmp_path / "target"), "mirrored-tiny", lambda e: None)
    assert copy.id == model.id
    assert copy.tags == ("ai/mirrored-tiny:latest",)


def test_progress_is_throttled_to_100ms_or_1mb() -> None:
    now = [0.0]
    events: list[ProgressEvent] = []
    tracker = TransferProgress(events.append, mode="pull", total=10_000_000, clock=lambda: now[0])
    tracker.update("sha256:a", 10_000_000, 0)  # first line always goes out
    for done in range(1, 100):  # 99 small steps, no time passing, < 1 MB
        tracker.update("sha256:a", 10_000_000, done * 1000)
    assert len(events) == 1
    tracker.update("sha256:a", 10_000_000, 1_100_000)  # over 1 MB since the last line
    assert len(events) == 2
    now[0] += 0.15  # over 100 ms
    tracker.update("sha256:a", 10_000_000, 1_100_001)
    assert len(events) == 3
    tracker.update("sha256:a", 10_000_000, 10_000_000)  # the end always goes out
    assert events[-1].layer_current == 10_000_000
    assert events[-1].to_json()["layer"] == {
        "id": "sha256:a",
        "size": 10_000_000,
        "current": 10_000_000,
    }
    assert events[-1].message == "Downloaded: 10.00 MB"


async def test_progress_never_makes_the_transfer_wait_for_the_event_loop() -> None:
    # The download thread hands events over and goes on; the loop delivers them in
    # batches, all of them, in order, before the transfer's result is returned.
    seen: list[ProgressEvent] = []
    emit = loop_callback(seen.append)
    started = threading.Event()

    def work(stop: threading.Event) -> float:
        started.set()
        began = time.monotonic()
        for done in range(2000):
            emit(ProgressEvent(type="progress", message="", mode="pull", layer_current=done))
        return time.monotonic() - began

    transfer = asyncio.ensure_future(run_transfer(work, emit))
    assert await asyncio.to_thread(started.wait, 10)
    # The loop is busy elsewhere (a slow client, a large response): blocking it is the point.
    time.sleep(0.5)  # noqa: ASYNC251
    took = await transfer
    assert took < 0.25  # waiting for the loop on any event would take >= 0.5 s
    assert [event.layer_current for event in seen] == list(range(2000))


async def test_proxy_environment_variables_are_honoured(
    oci_registry: LocalRegistry,
    registry_proxy: RecordingProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = Store.open(tmp_path / "source")
    tag = f"{oci_registry.host}/tests/via-proxy:v1"
    model = local_model(source, tmp_path, tag)
    await push_model(source, tag, lambda event: None)
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", registry_proxy.url)
    monkeypatch.setenv("INSECURE_REGISTRY", "true")
    # registry.test does not resolve: only the proxy can reach "it".
    copy = await pull_model(
        Store.open(tmp_path / "target"), "registry.test:5000/tests/via-proxy:v1", lambda e: None
    )
    assert copy.id == model.id
    assert registry_proxy.forwarded > 0


async def test_cncf_modelpack_artifact_is_read(oci_registry: LocalRegistry, tmp_path: Path) -> None:
    weights = tiny_gguf("modelpack", 50_000)
    config = json.dumps(
        {
            "descriptor": {"createdAt": "2025-01-01T00:00:00Z", "name": "tiny"},
            "config": {"format": "gguf", "paramSize": "1M", "quantization": "Q4_1"},
            "modelfs": {"type": "layers", "diffIds": []},
        }
    ).encode()
    upload_artifact(
        oci_registry,
        "tests/modelpack",
        "v1",
        "application/vnd.cncf.model.config.v1+json",
        config,
        [("application/vnd.cncf.model.weight.v1.gguf", weights)],
    )
    store = Store.open(tmp_path / "store")
    model = await pull_model(store, f"{oci_registry.host}/tests/modelpack:v1", lambda e: None)
    assert model.format == "gguf"
    assert model.model_config["quantization"] == "Q4_1"
    assert model.model_path().read_bytes() == weights


async def test_default_registry_names_where_bare_names_come_from(
    oci_registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Store.open(tmp_path / "source")
    tag = f"{oci_registry.host}/ai/default-tiny:latest"
    model = local_model(source, tmp_path, tag)
    await push_model(source, tag, lambda event: None)
    monkeypatch.setenv("DEFAULT_REGISTRY", oci_registry.host)
    copy = await pull_model(Store.open(tmp_path / "target"), "default-tiny", lambda e: None)
    assert copy.id == model.id
    assert copy.tags == ("ai/default-tiny:latest",)


async def test_bearer_token_exchange_and_api_token(
    oci_registry: LocalRegistry,
    registry_proxy: RecordingProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = Store.open(tmp_path / "source")
    tag = f"{oci_registry.host}/tests/token-auth:v1"
    model = local_model(source, tmp_path, tag)
    await push_model(source, tag, lambda event: None)
    registry_proxy.token_credentials = ("token-user", "token-pass")
    reference = f"{registry_proxy.host}/tests/token-auth:v1"

    with pytest.raises(RegistryAuthError):
        await pull_model(Store.open(tmp_path / "anonymous"), reference, lambda e: None)
    # Basic credentials are traded for a token at the challenge's realm.
    monkeypatch.setenv("DOCKER_USERNAME", "token-user")
    monkeypatch.setenv("DOCKER_PASSWORD", "token-pass")
    copy = await pull_model(Store.open(tmp_path / "exchanged"), reference, lambda e: None)
    assert copy.id == model.id
    assert any(r.path.startswith("/token") for r in registry_proxy.requests)
    # A bearer token handed to the API is used as it is.
    monkeypatch.delenv("DOCKER_USERNAME")
    monkeypatch.delenv("DOCKER_PASSWORD")
    copy = await pull_model(
        Store.open(tmp_path / "api-token"),
        reference,
        lambda e: None,
        bearer_token=registry_proxy.token,
    )
    assert copy.id == model.id
