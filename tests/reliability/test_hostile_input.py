"""Hostile input that is not a malformed body: model files that lie about
themselves, runtime flags that try to take the runner somewhere else, and keys
and origins that should not get in.

Covered elsewhere, referenced from docs/reliability.md rather than repeated:
hostile GGUF headers at packaging time (tests/test_packaging.py), hostile
tarballs with `..`, symlinks and filepath annotations (tests/test_models_api.py),
the allow-list itself (tests/test_scheduler_policies.py, plugins/llamacpp/tests).
"""

from __future__ import annotations

import json
import statistics
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from dmr.store import Store

from tests.fixtures.registry import build_manifest
from tests.fixtures.server import DmrServer, start_server
from tests.reliability.fake_registry import FakeRegistry, digest_of, serve
from tests.reliability.figures import record
from tests.reliability.live import MIB, put_smollm2

CHAT = "/engines/v1/chat/completions"
CONFIG_TYPE = "application/vnd.docker.ai.model.config.v0.1+json"
GGUF_TYPE = "application/vnd.docker.ai.gguf.v3"
API_KEY = "reliability-key-7d3e91c0a5"


def _string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def small_gguf(*, tensors: int = 1, kvs: int | None = None, offset: int = 0) -> bytes:
    """A GGUF v3 header with an architecture, one f32 tensor and its data."""
    entries = [
        _string("general.architecture") + struct.pack("<I", 8) + _string("llama"),
        _string("llama.context_length") + struct.pack("<I", 4) + struct.pack("<I", 2048),
    ]
    tensor = (
        _string("w") + struct.pack("<I", 1) + struct.pack("<Q", 64) + struct.pack("<IQ", 0, offset)
    )
    header = b"GGUF" + struct.pack("<IQQ", 3, tensors, len(entries) if kvs is None else kvs)
    body = header + b"".join(entries) + tensor
    body += b"\0" * (-len(body) % 32)
    return body + b"\0" * 256 + b"\1" * 4096


HOSTILE_GGUFS: dict[str, Callable[[], bytes]] = {
    "truncated": lambda: small_gguf()[:60],
    "huge_tensor_count": lambda: small_gguf(tensors=2**62),
    "huge_kv_count": lambda: small_gguf(kvs=2**40),
    "lying_string_length": lambda: small_gguf()[:24] + struct.pack("<Q", 2**60) + small_gguf()[32:],
    "lying_string_length_2gib": lambda: (
        small_gguf()[:24] + struct.pack("<Q", 2**31) + small_gguf()[32:]
    ),
    "tensor_offset_past_the_end": lambda: small_gguf(offset=2**40),
    "bad_magic": lambda: b"GGML" + small_gguf()[4:],
}


def artifact_registry(weights: bytes) -> FakeRegistry:
    """A model artifact around `weights`, built by hand: no dmr code checks it first."""
    digest = digest_of(weights)
    config = json.dumps(
        {
            "config": {"format": "gguf", "architecture": "llama"},
            "descriptor": {"created": "2024-01-01T00:00:00Z"},
            "rootfs": {"type": "rootfs", "diff_ids": [digest]},
        }
    ).encode()
    manifest = build_manifest(CONFIG_TYPE, config, [(GGUF_TYPE, weights)])
    return FakeRegistry(manifest=manifest, blobs={digest: weights, digest_of(config): config})


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DmrServer]:
    server = start_server(
        tmp_path_factory.mktemp("reliability-hostile"), {"INSECURE_REGISTRY": "true"}
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("kind", sorted(HOSTILE_GGUFS))
def test_hostile_gguf_in_a_pulled_model_is_refused_cleanly(
    hostile_server: DmrServer, kind: str
) -> None:
    """The weights of a pulled model lie: the pull refuses them with a clear error
    (the header is read with every length checked), never an out-of-memory crash,
    a hang or a dead server, and nothing of the model is kept."""
    server = hostile_server
    rss = psutil.Process(server.process.pid)
    before = rss.memory_info().rss
    weights = HOSTILE_GGUFS[kind]()
    with serve(artifact_registry(weights)) as registry:
        reference = f"{registry.host}/tests/hostile-{kind.replace('_', '-')}:v1"
        with httpx.Client(base_url=server.url, timeout=120) as client:
            started = time.monotonic()
            pulled = client.post("/models/create", json={"from": reference})
            seconds = time.monotonic() - started
            lines = [json.loads(line) for line in pulled.text.strip().splitlines()]
            assert pulled.status_code >= 400 or lines[-1]["type"] == "error", pulled.text
            message = lines[-1].get("message") or lines[-1].get("error", {}).get("message", "")
            if pulled.status_code >= 400:
                message = pulled.json()["error"]["message"]
            listed = client.get("/models")
            assert listed.status_code == 200  # still serving
            assert reference not in listed.text and "hostile" not in listed.text
    assert not Store.open(server.models_path).has_blob(digest_of(weights))
    grew = rss.memory_info().rss - before
    record(
        f"hostile_gguf_{kind}",
        refused_at="pull",
        error=message[:160],
        seconds=round(seconds, 2),
        server_rss_growth_mib=round(grew / MIB, 1),
    )
    assert message and "Traceback" not in message
    assert grew < 64 * MIB  # no allocation sized by the lie
    assert server.process.poll() is None


# --------------------------------------------------------------------------- flags


@pytest.fixture(scope="module")
def smollm2_configurable(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> Iterator[DmrServer]:
    tmp = tmp_path_factory.mktemp("reliability-flags")
    put_smollm2(tmp / "models", smollm2_gguf, "ai/smollm2", "2024-11-01T00:00:00Z")
    server = start_server(tmp)
    try:
        yield server
    finally:
        server.stop()


INJECTIONS: list[dict[str, object]] = [
    {"runtime-flags": ["--model", "other.gguf"]},
    {"runtime-flags": ["-m", "x"]},
    {"runtime-flags": ["--host", "0.0.0.0"]},
    {"runtime-flags": ["--port=80"]},
    {"runtime-flags": ["--mmproj", "x"]},
    {"runtime-flags": ["--embeddings"]},
    {"runtime-flags": ["--chat-template-file", "t.jinja"]},
    {"runtime-flags": ["--log-file", "/tmp/dmr-pwned"]},
    {"runtime-flags": ["--ctx-size", "../../etc/passwd"]},
    {"runtime-flags": ["--ctx-size=..\\x"]},
    {"runtime-flags": ["; touch /tmp/dmr-pwned"]},
    {"runtime-flags": ["--threads", "2", "x"]},
    {"runtime-flags": "--threads 2"},
    {"raw-runtime-flags": "--threads 2 $(touch /tmp/dmr-pwned)"},
    {"raw-runtime-flags": "--threads 2 `touch /tmp/dmr-pwned`"},
    {"raw-runtime-flags": "--threads 2 && touch /tmp/dmr-pwned"},
    {"raw-runtime-flags": "--threads '2"},
    {"raw-runtime-flags": "--model=/etc/passwd"},
]


@pytest.mark.llama
def test_runtime_flag_injection_through_configure_is_refused(
    smollm2_configurable: DmrServer,
) -> None:
    server = smollm2_configurable
    marker = Path("/tmp/dmr-pwned")
    marker.unlink(missing_ok=True)
    refused = 0
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for attempt in INJECTIONS:
            answer = client.post("/engines/_configure", json={"model": "ai/smollm2", **attempt})
            assert answer.status_code == 400, (attempt, answer.status_code, answer.text)
            assert answer.json()["error"]["message"]
            refused += 1
        assert client.get("/engines/_configure").json() == []  # nothing remembered
        assert client.get("/engines/ps").json() == []  # nothing started
        allowed = client.post(
            "/engines/_configure", json={"model": "ai/smollm2", "runtime-flags": ["--threads", "1"]}
        )
        assert allowed.status_code == 202, allowed.text
    assert not marker.exists()
    record("configure_flag_injection", attempts=len(INJECTIONS), refused_400=refused)


@pytest.mark.llama
@pytest.mark.parametrize(
    "llama_args", ["--model /etc/passwd", "--host 0.0.0.0 --port 8080", "--embeddings"]
)
def test_llama_args_cannot_take_over_the_runner(
    tmp_path: Path, smollm2_gguf: Path, llama_args: str
) -> None:
    put_smollm2(tmp_path / "models", smollm2_gguf, "ai/smollm2", "2024-11-01T00:00:00Z")
    server = start_server(tmp_path, {"LLAMA_ARGS": llama_args})
    try:
        body = {"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}]}
        answer = httpx.post(server.url + CHAT, json=body, timeout=120)
        flag = llama_args.split()[0]
        assert answer.status_code >= 400
        message = answer.json()["error"]["message"]
        assert flag in message, message
        assert httpx.get(server.url + "/models", timeout=30).status_code == 200
        # Refused before a runner process was started.
        assert psutil.Process(server.process.pid).children(recursive=True) == []
        record(
            f"llama_args_{flag.lstrip('-')}",
            status=answer.status_code,
            error=message[:160],
        )
    finally:
        server.stop()


# --------------------------------------------------------------------------- key, CORS


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DmrServer]:
    server = start_server(tmp_path_factory.mktemp("reliability-key"), {"DMR_API_KEY": API_KEY})
    try:
        yield server
    finally:
        server.stop()


def test_api_key_brute_force_learns_nothing_from_timing(keyed: DmrServer) -> None:
    """Wrong keys that share no prefix with the real one and wrong keys that share
    all but the last character take the same time (hmac.compare_digest), every
    one is a 401, and the real key still works afterwards."""
    rounds = 400
    far = "x" * len(API_KEY)
    near = API_KEY[:-1] + ("0" if API_KEY[-1] != "0" else "1")
    times: dict[str, list[float]] = {"far": [], "near": [], "short": []}
    statuses: set[int] = set()
    with httpx.Client(base_url=keyed.url, timeout=30) as client:
        for _ in range(20):  # warm the connection and the server's code paths
            client.get("/models", headers={"Authorization": f"Bearer {far}"})
        for index in range(rounds):
            # Interleaved so that drift in the machine's load hits all three alike.
            for name, key in (("far", far), ("near", near), ("short", "k"))[index % 3 :] + (
                ("far", far),
                ("near", near),
                ("short", "k"),
            )[: index % 3]:
                started = time.perf_counter()
                answer = client.get("/models", headers={"Authorization": f"Bearer {key}"})
                times[name].append(time.perf_counter() - started)
                statuses.add(answer.status_code)
        assert (
            client.get("/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        )
    medians = {name: statistics.median(values) for name, values in times.items()}
    spread = max(medians.values()) - min(medians.values())
    record(
        "api_key_timing",
        attempts=rounds * 3,
        statuses=sorted(statuses),
        median_ms={name: round(value * 1000, 3) for name, value in medians.items()},
        median_spread_ms=round(spread * 1000, 3),
    )
    assert statuses == {401}
    # A key comparison that leaked would show a steady gap between "near" and
    # "far"; HTTP noise on a shared machine is far larger than any compare, so
    # the bound is loose: the medians agree within 0.3 ms or 15 %.
    assert spread < max(0.0003, 0.15 * min(medians.values())), medians


def test_cors_from_a_foreign_origin_gets_nothing(keyed: DmrServer) -> None:
    evil = "https://evil.example"
    with httpx.Client(base_url=keyed.url, timeout=30) as client:
        preflight = client.options(
            "/engines/v1/chat/completions",
            headers={"Origin": evil, "Access-Control-Request-Method": "POST"},
        )
        plain = client.get(
            "/models", headers={"Origin": evil, "Authorization": f"Bearer {API_KEY}"}
        )
    assert preflight.status_code == 403
    assert "access-control-allow-origin" not in preflight.headers
    assert plain.status_code == 200  # the server answers; the browser will not let it be read
    assert "access-control-allow-origin" not in plain.headers
    record("cors_foreign_origin", preflight=preflight.status_code, allow_origin_header=False)
