"""One `dmr serve` over a real local Ray cluster (docs/cluster.md): two `ray start`
nodes on 127.0.0.1, each declaring one CPU and 2 GB of memory, SmolLM2 pulled by
each node from a real registry, and the official `openai` client against the head.

The tests run in order on one cluster; the last ones take nodes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anthropic
import ollama
import openai
import psutil
import pytest
from dmr.store.blobs import hash_file
from dmr.testing import free_port
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.registry import LocalRegistry
from tests.fixtures.server import DmrServer, server_env, start_server

pytestmark = [pytest.mark.llama, pytest.mark.slow, pytest.mark.xdist_group("ray")]

# Each node's declared memory: one SmolLM2 runner at a 4,096-token context (1.48 GB
# by the llama.cpp engine's estimate) fits, two do not, and one at 8,192 (2.31 GB)
# fits no node.
NODE_MEMORY = 2_000_000_000
RAY_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass
class LocalRayCluster:
    address: str
    temp_dir: Path
    node_stores: list[Path] = field(default_factory=list)

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster (its command line names the temp dir)."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(str(self.temp_dir) in part for part in process.info["cmdline"] or ()):
                    found.append(process)
        return found

    def raylets(self) -> list[psutil.Process]:
        """The raylets, the head's first (its socket is `raylet`, later ones `raylet.N`)."""
        raylets = [p for p in self.processes() if p.info["cmdline"][0].endswith("raylet")]
        return sorted(raylets, key=lambda p: any("raylet." in part for part in p.cmdline()))

    def add_node(self, store: Path, *extra: str) -> None:
        self.node_stores.append(store)
        started = _ray(
            "start", "--address", self.address, *_node_args(), *extra, env=_node_env(store)
        )
        assert started.returncode == 0, started.stdout + started.stderr

    def stop(self) -> None:
        processes = self.processes()
        for process in processes:
            with contextlib.suppress(psutil.Error):
                for child in process.children(recursive=True):
                    child.kill()
                process.kill()
        psutil.wait_procs(processes, timeout=10)


def _ray(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    return subprocess.run(
        [ray, *args], capture_output=True, text=True, env=env or RAY_ENV, timeout=180, check=False
    )


def _node_args() -> list[str]:
    return [
        "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--memory", str(NODE_MEMORY),
        "--disable-usage-stats",
    ]  # fmt: skip


def _node_env(store: Path) -> dict[str, str]:
    # A node's runners listen on 127.0.0.1 only, and each node keeps its own store.
    return {**RAY_ENV, "DMR_RAY_RUNNER_HOST": "127.0.0.1", "DMR_RAY_NODE_STORE": str(store)}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRayCluster]:
    # Short: Ray's socket paths live under it and must stay below 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="dmr-ray-"))
    stores = tmp_path_factory.mktemp("node-stores")
    cluster = LocalRayCluster(f"127.0.0.1:{free_port()}", temp_dir)
    try:
        head_store = stores / "head"
        cluster.node_stores.append(head_store)
        port = cluster.address.rsplit(":", 1)[1]
        head = _ray(
            "start", "--head", "--port", port, "--include-dashboard", "false",
            "--temp-dir", str(temp_dir), *_node_args(), env=_node_env(head_store),
        )  # fmt: skip
        assert head.returncode == 0, head.stdout + head.stderr
        cluster.add_node(stores / "second")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class ClusterServer:
    server: DmrServer
    cluster: LocalRayCluster
    models: dict[str, str]  # short name -> tag in the registry


@pytest.fixture(scope="module")
def head(
    ray_cluster: LocalRayCluster,
    oci_registry: LocalRegistry,
    smollm2_gguf: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ClusterServer]:
    server = start_server(
        tmp_path_factory.mktemp("ray-head"), {"DMR_RAY_ADDRESS": ray_cluster.address}
    )
    models = {}
    # One GGUF, three artifacts (three digests): their packaged context sizes differ.
    for name, context in (("a", "4096"), ("b", "4000"), ("huge", "8192")):
        tag = f"{oci_registry.host}/ray/smollm2-{name}:latest"
        packaged = server.cli(
            "package", "--gguf", str(smollm2_gguf), "--context-size", context, tag
        )
        assert packaged.returncode == 0, packaged.stderr
        pushed = server.cli("push", tag)
        assert pushed.returncode == 0, pushed.stderr
        models[name] = tag
    try:
        yield ClusterServer(server, ray_cluster, models)
    finally:
        server.stop()


def ps(server: DmrServer) -> list[dict[str, object]]:
    with server.client() as client:
        answer: list[dict[str, object]] = client.get("/engines/ps").json()
        return answer


def unload_all(server: DmrServer) -> None:
    with server.client() as client:
        assert client.post("/engines/unload", json={"all": True}).status_code == 200


def node_counts(server: DmrServer, family_name: str) -> Counter[str]:
    """A runner metric's value on each node (the head labels runner samples by node)."""
    with server.client() as client:
        text = client.get("/metrics").text
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            for sample in family.samples:
                if sample.name in (family_name, f"{family_name}_total"):
                    counts[sample.labels["node"]] += int(sample.value)
    return counts


def chat(server: DmrServer, model: str, question: str, *, tokens: int = 8) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/engines/v1", api_key="none", timeout=300)
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=tokens
    )
    return answer.choices[0].message.content or ""


async def long_stream(server: DmrServer, model: str, n: int) -> str:
    """A 400-token streamed tale: "done", or "error: ..." as the client saw it."""
    client = openai.AsyncOpenAI(
        base_url=f"{server.url}/engines/v1", api_key="none", max_retries=0, timeout=300
    )
    try:
        chunks = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"A very long tale, part {n}."}],
            max_tokens=400,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for _ in chunks:
            pass
    except openai.APIError as error:
        return f"error: {error}"
    return "done"


def test_two_models_that_each_fit_one_node_are_placed_on_different_nodes(
    head: ClusterServer,
) -> None:
    server = head.server
    assert chat(server, head.models["a"], "Say hi")
    assert chat(server, head.models["b"], "Say hello")
    runners = ps(server)
    assert len(runners) == 2, runners
    nodes = {runner["node"] for runner in runners}
    assert len(nodes) == 2 and None not in nodes, runners
    # Each node's runner computes with the one CPU its node declares.
    assert set(node_counts(server, "llamacpp:threads").values()) == {1}
    listed = server.cli("ps")
    assert listed.returncode == 0 and "NODE" in listed.stdout.splitlines()[0]
    assert listed.stdout.count("ray node ") == 2, listed.stdout
    status = server.cli("status", "--json")
    assert '"connected": true' in status.stdout, status.stdout
    # The bridge says when Ray started each runner's actor (the stage a slow start is in).
    assert server.log().count("Ray started its actor") >= 2, server.log()[-3000:]
    unload_all(server)


def test_every_dialect_and_the_diffusers_engine_are_served_from_the_nodes(
    head: ClusterServer, oci_registry: LocalRegistry, tiny_diffusers_dduf: Path
) -> None:
    server = head.server
    ollama_answer = ollama.Client(host=server.url).chat(
        model=head.models["a"],
        messages=[{"role": "user", "content": "Say hi"}],
        options={"num_predict": 8},
    )
    assert ollama_answer.message.content
    anthropic_answer = anthropic.Anthropic(
        base_url=f"{server.url}/anthropic", api_key="unused", max_retries=0
    ).messages.create(
        model=head.models["a"], max_tokens=8, messages=[{"role": "user", "content": "Say hi"}]
    )
    assert anthropic_answer.content
    tag = f"{oci_registry.host}/ray/tiny-sd:latest"
    packaged = server.cli("package", "--dduf", str(tiny_diffusers_dduf), tag, "--push")
    assert packaged.returncode == 0, packaged.stderr + packaged.stdout
    images = openai.OpenAI(base_url=f"{server.url}/engines/v1", api_key="none").images
    image = images.generate(
        model=tag, prompt="a lighthouse", size="64x64", response_format="b64_json"
    )  # type: ignore[arg-type]
    assert image.data and image.data[0].b64_json
    runners = ps(server)
    assert {r["backend_name"] for r in runners} == {"llama.cpp", "diffusers"}, runners
    assert all(r["node"] is not None for r in runners), runners
    unload_all(server)


def test_a_model_that_fits_no_node_is_refused_naming_the_largest(head: ClusterServer) -> None:
    with head.server.client() as client:
        answer = client.post(
            "/engines/v1/chat/completions",
            json={"model": head.models["huge"], "messages": [{"role": "user", "content": "hi"}]},
        )
    assert answer.status_code == 507, answer.text
    message = answer.json()["error"]["message"]
    assert "fits no node of the cluster" in message and "ray node " in message
    assert str(NODE_MEMORY) in message


def test_replicas_share_the_load_and_a_conversation_keeps_its_replica(
    head: ClusterServer,
) -> None:
    server = head.server
    model = head.models["a"]
    configured = server.cli("configure", "--replicas", "2", model)
    assert configured.returncode == 0, configured.stderr
    before = node_counts(server, "llamacpp:tokens_predicted")

    async def many() -> None:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/engines/v1", api_key="none")
        await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": f"Story number {n}, please."}],
                    max_tokens=16,
                )
                for n in range(8)
            )
        )

    asyncio.run(many())
    runners = [r for r in ps(server) if r["model_name"] == model.removesuffix(":latest")]
    assert len({r["node"] for r in runners}) == 2, runners
    spread = node_counts(server, "llamacpp:tokens_predicted") - before
    assert len(spread) == 2 and min(spread.values()) >= 16, spread

    # The same conversation, turn after turn, goes back to one replica (its cache).
    before = node_counts(server, "llamacpp:tokens_predicted")
    system = {"role": "system", "content": "You are a lighthouse keeper."}
    first = {"role": "user", "content": "What do you see tonight?"}
    client = openai.OpenAI(base_url=f"{server.url}/engines/v1", api_key="none", timeout=300)
    turns: list[dict[str, str]] = [system, first]
    for _ in range(3):
        answer = client.chat.completions.create(model=model, messages=turns, max_tokens=8)  # type: ignore[arg-type]
        turns += [{"role": "assistant", "content": answer.choices[0].message.content or ""},
                  {"role": "user", "content": "And then?"}]  # fmt: skip
    used = node_counts(server, "llamacpp:tokens_predicted") - before
    assert len(used) == 1, used


def test_a_tampered_copy_on_a_node_is_pulled_again_before_serving(head: ClusterServer) -> None:
    server = head.server
    unload_all(server)
    tampered = []
    for store in head.cluster.node_stores:
        for blob in (store / "blobs" / "sha256").glob("*"):
            if blob.stat().st_size > 10_000_000:  # SmolLM2's weights
                with blob.open("r+b") as handle:
                    handle.seek(1_000_000)
                    handle.write(b"\0" * 4096)
                tampered.append(blob)
    assert tampered, "no node holds the model's weights yet"
    assert chat(server, head.models["b"], "Say hello")
    # The node that served it checked its copy, found it wrong and pulled it again.
    repaired = [blob for blob in tampered if hash_file(blob)[0] == f"sha256:{blob.name}"]
    assert repaired, tampered


def test_a_shared_store_is_read_in_place_and_never_served_unverified(
    head: ClusterServer, smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    unload_all(head.server)  # Ray counts its runners' memory too
    server = start_server(
        tmp_path_factory.mktemp("ray-shared"),
        {"DMR_RAY_ADDRESS": head.cluster.address, "DMR_RAY_SHARED_STORE": "1"},
    )
    try:
        # Packaged here and pushed nowhere: the nodes can only read it in place.
        tag = "ray/shared-only:latest"
        packaged = server.cli("package", "--gguf", str(smollm2_gguf), "--context-size", "2048", tag)
        assert packaged.returncode == 0, packaged.stderr
        assert chat(server, tag, "Say hi")
        [runner] = ps(server)
        assert runner["node"] is not None
        model_id = str(runner["model_id"])
        for store in head.cluster.node_stores:
            assert not (store / "manifests" / "sha256" / model_id.removeprefix("sha256:")).exists()
        unload_all(server)
        weights = max(
            (server.models_path / "blobs" / "sha256").glob("*"), key=lambda b: b.stat().st_size
        )
        with weights.open("r+b") as handle:
            handle.seek(2_000_000)
            handle.write(b"\0" * 4096)
        with server.client() as client:
            answer = client.post(
                "/engines/v1/chat/completions",
                json={"model": tag, "messages": [{"role": "user", "content": "hi"}]},
            )
        assert answer.status_code >= 500, answer.text
        assert "does not match its digest" in answer.json()["error"]["message"]
        assert ps(server) == []
    finally:
        server.stop()


def test_a_lost_node_ends_its_streams_cleanly_and_new_requests_go_on(
    head: ClusterServer,
) -> None:
    server = head.server
    model = head.models["a"]
    unload_all(server)
    assert chat(server, model, "warm up")  # the replicas are placed again
    deadline = time.monotonic() + 120
    while len([r for r in ps(server) if not r["loading"]]) < 2:
        assert time.monotonic() < deadline, ps(server)
        time.sleep(0.5)
    second = head.cluster.raylets()[1]

    async def kill_mid_stream() -> list[str]:
        streams = [asyncio.create_task(long_stream(server, model, n)) for n in range(4)]
        await asyncio.sleep(3)
        for process in [*second.children(recursive=True), second]:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
        started = time.monotonic()
        outcomes = await asyncio.wait_for(asyncio.gather(*streams), 120)
        assert time.monotonic() - started < 60, "a stream hung after its node died"
        return outcomes

    outcomes = asyncio.run(kill_mid_stream())
    assert all(o == "done" or o.startswith("error:") for o in outcomes), outcomes
    assert "done" in outcomes, outcomes  # the streams on the other node finish
    failed = [o for o in outcomes if o != "done"]
    assert failed and all("lost" in o or "runner" in o for o in failed), outcomes
    # New requests are served by the replica left, at once.
    started = time.monotonic()
    assert chat(server, model, "Still there?")
    assert time.monotonic() - started < 30
    # A new node: the missing replica is placed on it, with no request asking.
    head.cluster.add_node(head.cluster.node_stores[0].parent / "third")
    deadline = time.monotonic() + 120
    while len({r["node"] for r in ps(server) if not r["loading"]}) < 2:
        assert time.monotonic() < deadline, ps(server)
        time.sleep(1)
    assert chat(server, model, "Again?")


def test_a_node_that_stops_answering_ends_its_streams_without_a_hang(
    head: ClusterServer,
) -> None:
    """A node that vanishes without closing its connections (SIGSTOP of its raylet and
    every process under it, as a machine that loses power): its streams end once Ray
    marks the node dead, never hang; the other replica's finish."""
    server = head.server
    model = head.models["a"]
    deadline = time.monotonic() + 120
    while len({r["node"] for r in ps(server) if not r["loading"]}) < 2:
        assert time.monotonic() < deadline, ps(server)
        time.sleep(0.5)
    raylet = head.cluster.raylets()[1]
    frozen = [*raylet.children(recursive=True), raylet]

    async def freeze_mid_stream() -> tuple[list[str], float]:
        streams = [asyncio.create_task(long_stream(server, model, n)) for n in range(4)]
        await asyncio.sleep(3)
        for process in frozen:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        outcomes = await asyncio.wait_for(asyncio.gather(*streams), 240)
        return outcomes, time.monotonic() - started

    try:
        outcomes, waited = asyncio.run(freeze_mid_stream())
    finally:
        for process in frozen:
            with contextlib.suppress(psutil.Error):
                process.kill()
    assert "done" in outcomes, outcomes
    failed = [o for o in outcomes if o != "done"]
    assert failed and all(o.startswith("error:") for o in failed), outcomes
    assert waited < 120, f"the frozen node's streams took {waited:.0f}s to end"
    assert chat(server, model, "Anyone left?")


def cluster_nodes(server: DmrServer) -> set[str]:
    with server.client() as client:
        return set(client.get("/engines/hardware").json()["cluster"]["nodes"])


def test_a_node_that_declares_a_gpu_gets_the_model_first(head: ClusterServer) -> None:
    """A fake GPU node, named as such: `ray start --num-gpus 1` with the VRAM declared as
    `gpu_memory` on this machine, which has no GPU (llama.cpp's CPU build then
    computes on the CPU). Placement prefers GPU nodes and budgets their VRAM."""
    server = head.server
    unload_all(server)
    before = cluster_nodes(server)
    gpu = {"gpu_memory": 3_000_000_000}
    store = head.cluster.node_stores[0].parent / "fake-gpu"
    head.cluster.add_node(store, "--num-gpus", "1", "--resources", json.dumps(gpu))
    deadline = time.monotonic() + 60
    while not cluster_nodes(server) - before:  # (a node lost earlier may leave the list)
        assert time.monotonic() < deadline, cluster_nodes(server)
        time.sleep(0.5)
    [gpu_node] = cluster_nodes(server) - before
    assert chat(server, head.models["b"], "Say hi")
    [runner] = ps(server)
    assert runner["device"] == gpu_node, (runner, gpu_node)
    with server.client() as client:
        hardware = client.get("/engines/hardware").json()
    assert gpu_node in hardware["scheduler_devices"]
    unload_all(server)


def test_losing_the_cluster_is_reported_and_models_load_on_this_machine(
    head: ClusterServer,
) -> None:
    """Last: it kills the cluster's control store (GCS)."""
    server = head.server
    for process in head.cluster.processes():
        if process.info["cmdline"][0].endswith("gcs_server"):
            process.kill()
    deadline = time.monotonic() + 90
    while True:
        with server.client() as client:
            status = client.get("/engines/status")
        assert status.status_code == 200
        if status.json().get("ray", "").startswith("Error: not connected"):
            break
        assert time.monotonic() < deadline, status.json()
        time.sleep(1)
    unload_all(server)
    assert chat(server, head.models["b"], "Are you local now?")
    [runner] = ps(server)
    assert runner["node"] is None and runner["device"] != "", runner


def test_an_address_with_no_cluster_fails_within_the_deadline(tmp_path: Path) -> None:
    # The server is run to its exit, not polled for health: while it waits for the
    # cluster its port is not bound yet, and a server another test worker started on
    # the same port number in that window once answered the poll for it.
    address = f"127.0.0.1:{free_port()}"
    env = server_env(
        tmp_path,
        free_port(),
        {"DMR_RAY_ADDRESS": address, "DMR_RAY_CONNECT_TIMEOUT_SECONDS": "10"},
    )
    started = time.monotonic()
    ended = subprocess.run(
        [sys.executable, "-m", "dmr", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert time.monotonic() - started < 45
    assert ended.returncode != 0
    assert f"cannot reach the Ray cluster at {address}" in ended.stdout + ended.stderr
