"""The Ray plugin's parts that need no cluster: the hook, nodes as devices, pinned
references, the digest check of a node's models, and the bridge giving up on an
address where no cluster answers. tests/test_ray_cluster.py runs a real cluster."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

import pytest
from dmr.distribution.packaging import PackageOptions, package_gguf, write_to_store
from dmr.errors import RunnerError
from dmr.records import Mode, RunnerConfig, RunnerLaunch
from dmr.settings import Settings
from dmr.store import Store, StoredModel
from dmr.testing import free_port, sample_gguf
from dmr_ray import placement as placement_module
from dmr_ray.node_model import (
    DigestMismatchError,
    ensure_model,
    mismatched_blobs,
    pinned_reference,
)
from dmr_ray.placement import ClusterUnreachableError, RayPlacement, node_device
from dmr_ray.plugin import dmr_runner_placement

GB = 1_000_000_000


def test_the_hook_offers_a_placement_only_with_a_ray_address(tmp_path: Path) -> None:
    assert dmr_runner_placement(settings=Settings(models_path=tmp_path)) is None
    placement = dmr_runner_placement(
        settings=Settings(models_path=tmp_path, ray_address="10.0.0.1:6379")
    )
    assert isinstance(placement, RayPlacement)
    assert not placement.connected and placement.devices() == []


@pytest.mark.parametrize(
    ("tag", "pinned"),
    [
        ("127.0.0.1:5000/ns/model:latest", "127.0.0.1:5000/ns/model@sha256:ab"),
        ("ai/smollm2:latest", "ai/smollm2@sha256:ab"),
        ("127.0.0.1:5000/ns/model", "127.0.0.1:5000/ns/model@sha256:ab"),
        ("ai/model@sha256:other", "ai/model@sha256:ab"),
        ("sha256:ab", None),
    ],
)
def test_a_node_pulls_the_manifest_by_its_digest_whatever_the_tag_names_now(
    tag: str, pinned: str | None
) -> None:
    assert pinned_reference(tag, "sha256:ab") == pinned


def test_nodes_are_devices_budgeted_by_their_declared_memory() -> None:
    cpu = node_device({"id": "a" * 56, "address": "10.0.0.2", "cpus": 4.0, "memory": 8 * GB})
    assert cpu is not None
    assert (cpu.kind, cpu.total_memory, cpu.free_memory, cpu.cores) == ("cpu", 8 * GB, 8 * GB, 4)
    assert cpu.node == "a" * 56 and cpu.name == "ray node 10.0.0.2 (aaaaaaaa)"
    gpu = {"id": "b" * 56, "cpus": 8.0, "gpus": 1.0, "memory": 60 * GB, "gpu_memory": 80 * GB}
    declared = node_device(gpu)
    assert declared is not None and (declared.kind, declared.total_memory) == ("cuda", 80 * GB)
    # Ray knows no VRAM: a GPU node that does not declare it is budgeted by its memory.
    undeclared = node_device({**gpu, "gpu_memory": 0.0})
    assert undeclared is not None and undeclared.total_memory == 60 * GB
    # A head started with --num-cpus 0 (and no GPU) takes no runner.
    assert node_device({"id": "c" * 56, "cpus": 0.0, "memory": 4 * GB}) is None


@pytest.fixture
def stored_model(tmp_path: Path) -> tuple[Store, StoredModel]:
    store = Store.open(tmp_path / "store")
    options = PackageOptions(created="2024-11-01T00:00:00Z")
    write_to_store(store, package_gguf([sample_gguf()], options), ["test/ray-node:latest"])
    return store, store.get("test/ray-node:latest")


async def test_a_shared_store_is_served_only_while_every_blob_matches_its_digest(
    stored_model: tuple[Store, StoredModel],
) -> None:
    store, stored = stored_model
    shared = str(store.root)
    assert mismatched_blobs(store, stored) == []
    served = await ensure_model(stored.id, list(stored.tags), node="n1", shared_root=shared)
    assert served.id == stored.id and served.bundle_dir == stored.bundle_dir
    weights = max(stored.files, key=lambda digest: store.blob_path(digest).stat().st_size)
    with store.blob_path(weights).open("r+b") as handle:
        handle.seek(1_000_000)
        handle.write(b"\0" * 4096)
    assert mismatched_blobs(store, stored) == [weights]
    with pytest.raises(DigestMismatchError) as refused:
        await ensure_model(stored.id, list(stored.tags), node="n1", shared_root=shared)
    assert f"blob {weights} from the shared store does not match its digest" in str(refused.value)


async def test_a_model_in_no_registry_is_refused_with_what_to_do(
    stored_model: tuple[Store, StoredModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, stored = stored_model
    monkeypatch.setenv("DMR_RAY_NODE_STORE", str(tmp_path / "node-store"))
    # A tag whose registry does not answer: 127.0.0.1 on a port nothing listens on.
    tag = f"127.0.0.1:{free_port()}/test/ray-node:latest"
    with pytest.raises(Exception) as refused:
        await ensure_model(stored.id, [tag], node="n1", shared_root=None)
    message = str(refused.value)
    assert f"node n1 cannot get {tag}" in message and "DMR_RAY_SHARED_STORE=1" in message


async def test_an_address_with_no_cluster_is_a_clear_error_within_the_deadline(
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    settings = Settings(models_path=tmp_path, ray_address=address, ray_connect_timeout=10)
    placement = RayPlacement(settings)
    started = time.monotonic()
    with pytest.raises(ClusterUnreachableError) as refused:
        await placement.start()
    assert time.monotonic() - started < 30
    assert f"cannot reach the Ray cluster at {address}" in str(refused.value)
    assert not placement.connected


async def test_a_deadline_passed_leaves_no_unread_error(tmp_path: Path) -> None:
    """The bridge ending after `start` gave up set an error nobody read: asyncio logged
    "Future exception was never retrieved" with an EOFError into the server's log."""
    unhandled: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        address = f"127.0.0.1:{free_port()}"
        # Shorter than the bridge takes to import Ray: the deadline passes first.
        settings = Settings(models_path=tmp_path, ray_address=address, ray_connect_timeout=0.2)
        placement = RayPlacement(settings)
        with pytest.raises(ClusterUnreachableError, match="no answer within"):
            await placement.start()
        await asyncio.sleep(0.5)  # the bridge's pipes closing, its reader ending
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert [context.get("message") for context in unhandled] == []


def _launch_on(tmp_path: Path, node_id: str) -> RunnerLaunch:
    device = node_device({"id": node_id, "address": "10.0.0.2", "cpus": 1.0, "memory": 2 * GB})
    assert device is not None
    return RunnerLaunch(
        model_id="sha256:" + "0" * 64,
        model_name="ai/model",
        bundle_dir=tmp_path,
        model_config={},
        mode=Mode.COMPLETION,
        socket_path=tmp_path / "runner.sock",
        config=RunnerConfig(),
        device=device,
    )


async def test_a_runner_starting_on_a_node_that_leaves_the_cluster_fails_at_once(
    tmp_path: Path,
) -> None:
    # Ray keeps an actor bound to a dead node pending: the start, with a request
    # waiting on it, waited out PLACE_TIMEOUT (15 minutes) in a cluster test.
    placement = RayPlacement(Settings(models_path=tmp_path, ray_address="10.0.0.1:6379"))
    node_id = "a" * 56
    node = {"id": node_id, "address": "10.0.0.2", "cpus": 1.0, "memory": 2 * GB}
    placement._nodes = [node]
    asked: list[str] = []

    async def bridge(message: dict[str, object], seconds: float) -> object:
        asked.append(str(message["op"]))
        if message["op"] == "start":
            await asyncio.Event().wait()  # pending, as Ray leaves it
        return None

    placement.call = bridge  # type: ignore[method-assign]
    runner = placement.place(
        "llamacpp", _launch_on(tmp_path, node_id), name="r", memory=GB, log_path=None
    )
    starting = asyncio.ensure_future(runner.start())
    await asyncio.sleep(0.05)
    assert not starting.done()
    placement._on_event({"event": "nodes", "nodes": []})  # the bridge's next look
    with pytest.raises(RunnerError) as failed:
        await asyncio.wait_for(starting, 5)
    message = failed.value.message
    assert "could not start" in message and "left the Ray cluster" in message
    assert asked == ["start", "stop"] and runner.returncode is not None


def test_a_node_ray_reports_dead_under_a_runner_gets_no_new_runner(tmp_path: Path) -> None:
    placement = RayPlacement(Settings(models_path=tmp_path, ray_address="10.0.0.1:6379"))
    dead, alive = "a" * 56, "b" * 56
    placement._nodes = [
        {"id": node, "address": "10.0.0.2", "cpus": 1.0, "memory": 2 * GB} for node in (dead, alive)
    ]
    runner = placement.place(
        "llamacpp", _launch_on(tmp_path, dead), name="r", memory=GB, log_path=None
    )
    placement.register(runner)
    placement._on_event(
        {"event": "exited", "runner": runner.id, "code": -9, "reason": "lost", "node_lost": True}
    )
    assert runner.returncode == -9
    assert [device.node for device in placement.devices()] == [alive]


async def test_a_slow_placement_says_which_stage_it_waits_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A start that waits is either Ray not placing the actor or the node fetching the
    # model and starting the runner: the log must tell which (a CI hang did not).
    monkeypatch.setattr(placement_module, "PLACE_NOTE_SECONDS", 0.05)
    placement = RayPlacement(Settings(models_path=tmp_path, ray_address="10.0.0.1:6379"))
    node_id = "a" * 56
    placement._nodes = [{"id": node_id, "address": "10.0.0.2", "cpus": 1.0, "memory": 2 * GB}]
    answer: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def bridge(message: dict[str, object], seconds: float) -> object:
        return await answer if message["op"] == "start" else None

    placement.call = bridge  # type: ignore[method-assign]
    runner = placement.place(
        "llamacpp", _launch_on(tmp_path, node_id), name="r", memory=GB, log_path=None
    )
    caplog.set_level("INFO", logger="dmr_ray.placement")
    starting = asyncio.ensure_future(runner.start())
    await asyncio.sleep(0.12)
    assert "Ray has not started its actor on the node yet" in caplog.text
    assert "fetching the model" not in caplog.text
    placement._on_event({"event": "placed", "runner": runner.id})
    caplog.clear()
    await asyncio.sleep(0.12)
    assert "the node is fetching the model and starting the runner" in caplog.text
    answer.set_result(
        {"host": "10.0.0.2", "port": 1, "pid": 7, "argv": ["x"], "startup_timeout": 5,
         "cpu_share": False}
    )  # fmt: skip
    command = await asyncio.wait_for(starting, 5)
    assert command.argv == ("x",) and runner.address == ("10.0.0.2", 1)
