"""`dmr pull` / `dmr push` through a real server, a real registry and the real CLI."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from dmr.distribution import packaging
from dmr.distribution.packaging import PackageOptions
from dmr.store import Store, StoredModel

from tests.fixtures.hf_hub import FakeHub, tiny_gguf
from tests.fixtures.registry import LocalRegistry, RecordingProxy, upload_artifact
from tests.fixtures.server import DmrServer, start_server

pytestmark = pytest.mark.registry

ServerFactory = Callable[..., DmrServer]


def package_into(server: DmrServer, tmp_path: Path, tag: str, payload: int) -> StoredModel:
    """`dmr package` equivalent: a small synthetic GGUF into the server's store."""
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf(tag, payload))
    artifact = packaging.package_gguf([path], PackageOptions(created="2024-01-01T00:00:00Z"))
    return packaging.write_to_store(Store.open(server.models_path), artifact, [tag])


def model_path(name: str) -> str:
    return "/models/" + quote(name, safe="/:@")


@pytest.mark.parametrize("registry_kind", ["open", "htpasswd"])
def test_push_rm_pull_inspect_round_trip(
    registry_kind: str,
    request: pytest.FixtureRequest,
    dmr_server_factory: ServerFactory,
    tmp_path: Path,
) -> None:
    fixture = "oci_registry" if registry_kind == "open" else "auth_registry"
    registry: LocalRegistry = request.getfixturevalue(fixture)
    env = {"INSECURE_REGISTRY": "true"}
    if registry.username:
        env |= {"DOCKER_USERNAME": registry.username, "DOCKER_PASSWORD": registry.password or ""}
    server = dmr_server_factory(**env)
    tag = f"{registry.host}/tests/cli-{registry_kind}:v1"
    model = package_into(server, tmp_path, tag, payload=3_000_000)

    pushed = server.cli("push", tag)
    assert pushed.returncode == 0, pushed.stderr + pushed.stdout
    assert "pushed successfully" in pushed.stdout

    with server.client() as client:
        assert client.delete(model_path(tag)).status_code == 200
        assert client.get(model_path(tag)).status_code == 404

    # The registry's copy, read from its manifest and config without pulling.
    remote = server.cli("inspect", "--remote", tag)
    assert remote.returncode == 0, remote.stderr
    described = json.loads(remote.stdout)
    assert described["id"] == model.id and described["tags"] == [tag]
    assert described["config"]["format"] == model.config["config"]["format"]
    assert sum(layer["size"] for layer in described["layers"]) >= 3_000_000
    with server.client() as client:
        assert client.get(model_path(tag), params={"remote": "true"}).json()["id"] == model.id
        assert client.get(model_path(tag)).status_code == 404  # nothing was stored
        absent = model_path(f"{registry.host}/tests/absent:v1")
        missing = client.get(absent, params={"remote": "true"})
    assert missing.status_code == 404

    pulled = server.cli("pull", tag)
    assert pulled.returncode == 0, pulled.stderr + pulled.stdout
    assert "pulled successfully" in pulled.stdout
    with server.client() as client:
        inspected = client.get(model_path(tag))
    assert inspected.status_code == 200
    assert inspected.json()["id"] == model.id
    assert tag in inspected.json()["tags"]


def test_unknown_config_media_type_is_422(
    oci_registry: LocalRegistry, dmr_server_factory: ServerFactory
) -> None:
    upload_artifact(
        oci_registry,
        "tests/not-a-model-api",
        "v1",
        "application/vnd.example.thing.config.v1+json",
        b"{}",
        [("application/vnd.docker.ai.gguf.v3", b"weights")],
    )
    server = dmr_server_factory(INSECURE_REGISTRY="true")
    reference = f"{oci_registry.host}/tests/not-a-model-api:v1"
    with server.client() as client:
        answer = client.post("/models/create", json={"from": reference})
    assert answer.status_code == 422, answer.text
    assert "media type" in answer.text
    pulled = server.cli("pull", reference)
    assert pulled.returncode == 1
    assert "unsupported config media type" in pulled.stderr
    assert len(pulled.stderr.strip().splitlines()) <= 2  # one clear line (maybe wrapped)


def test_wrong_credentials_give_one_clear_error(
    auth_registry: LocalRegistry, dmr_server_factory: ServerFactory
) -> None:
    server = dmr_server_factory(
        DOCKER_USERNAME=auth_registry.username or "", DOCKER_PASSWORD="wrong-password"
    )
    pulled = server.cli("pull", f"{auth_registry.host}/tests/whatever:v1")
    assert pulled.returncode == 1
    assert "refused the credentials" in pulled.stderr
    assert "Traceback" not in pulled.stderr


def _wait_for_partial(models_path: Path, at_least: int, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for partial in (models_path / "blobs" / "sha256").glob("*.incomplete"):
            if partial.stat().st_size >= at_least:
                return partial
        time.sleep(0.05)
    raise AssertionError("the pull never wrote a partial blob")


def _start_cli_pull(server: DmrServer, reference: str) -> subprocess.Popen[str]:
    # The CLI must get Ctrl-C as in a terminal even when the tests run as a background
    # job, which starts with SIGINT ignored: a child inherits an ignored signal, while
    # a handled one is reset to the default across exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "dmr", "pull", reference],
            env=server.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def test_pull_killed_half_way_resumes_with_only_the_rest(
    oci_registry: LocalRegistry,
    registry_proxy: RecordingProxy,
    tmp_path: Path,
) -> None:
    size_hint = 6_000_000
    (tmp_path / "first").mkdir()
    first = start_server(tmp_path / "first", {"INSECURE_REGISTRY": "true"})
    try:
        tag = f"{oci_registry.host}/tests/interrupted:v1"
        model = package_into(first, tmp_path, tag, payload=size_hint)
        assert first.cli("push", tag).returncode == 0
        digest = model.manifest["layers"][0]["digest"]
        size = model.manifest["layers"][0]["size"]
    finally:
        first.stop()

    workdir = tmp_path / "puller"
    workdir.mkdir()
    registry_proxy.bytes_per_second = 1_500_000  # slow enough to kill half-way
    reference = f"{registry_proxy.host}/tests/interrupted:v1"
    server = start_server(workdir, {"INSECURE_REGISTRY": "true"})
    cli = _start_cli_pull(server, reference)
    try:
        _wait_for_partial(server.models_path, 1_000_000)
        os.killpg(server.process.pid, signal.SIGKILL)  # the server dies mid-pull
        server.process.wait(timeout=10)
        _out, err = cli.communicate(timeout=30)
        assert cli.returncode == 1, err
    finally:
        if cli.poll() is None:
            cli.kill()
        server.stop()
    partial = (
        server.models_path / "blobs" / "sha256" / (digest.removeprefix("sha256:") + ".incomplete")
    )
    kept = partial.stat().st_size
    assert 0 < kept < size

    registry_proxy.bytes_per_second = None
    again = start_server(workdir, {"INSECURE_REGISTRY": "true"})
    try:
        before = len(registry_proxy.requests)
        pulled = again.cli("pull", reference)
        assert pulled.returncode == 0, pulled.stderr
        resumed = [
            r
            for r in registry_proxy.requests[before:]
            if r.method == "GET" and r.path.endswith(digest)
        ]
        assert [r.range for r in resumed] == [f"bytes={kept}-"]
        assert resumed[0].bytes_sent == size - kept
        with again.client() as client:
            assert client.get(model_path(reference)).json()["id"] == model.id
    finally:
        again.stop()


def test_ctrl_c_stops_the_pull_and_the_next_pull_resumes(
    oci_registry: LocalRegistry,
    registry_proxy: RecordingProxy,
    dmr_server_factory: ServerFactory,
    tmp_path: Path,
) -> None:
    server = dmr_server_factory(INSECURE_REGISTRY="true")
    tag = f"{oci_registry.host}/tests/ctrl-c:v1"
    model = package_into(server, tmp_path, tag, payload=5_000_000)
    assert server.cli("push", tag).returncode == 0
    with server.client() as client:
        client.delete(model_path(tag))
    digest = model.manifest["layers"][0]["digest"]
    size = model.manifest["layers"][0]["size"]

    # Slow enough (10 s for the 5 MB) that the Ctrl-C lands mid-pull on a loaded machine.
    registry_proxy.bytes_per_second = 500_000
    reference = f"{registry_proxy.host}/tests/ctrl-c:v1"
    cli = _start_cli_pull(server, reference)
    try:
        _wait_for_partial(server.models_path, 1_000_000)
        cli.send_signal(signal.SIGINT)
        _out, err = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, err
    assert "resume" in err
    registry_proxy.bytes_per_second = None
    time.sleep(0.5)  # the server notices the client left and stops at its next chunk
    before = len(registry_proxy.requests)
    pulled = server.cli("pull", reference)
    assert pulled.returncode == 0, pulled.stderr
    resumed = [r for r in registry_proxy.requests[before:] if r.path.endswith(digest)]
    assert len(resumed) == 1 and resumed[0].range is not None
    start = int(resumed[0].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < start < size
    assert resumed[0].bytes_sent == size - start


def test_hugging_face_pull_through_the_server(
    fake_hub: FakeHub, dmr_server_factory: ServerFactory
) -> None:
    weights = tiny_gguf("server-q8", 20_000)
    fake_hub.add_repo(
        "TestOrg/Server-GGUF",
        {"m-Q8_0.gguf": weights, "m-Q4_K_M.gguf": tiny_gguf("server-q4", 20_000)},
    )
    # HF_ENDPOINT must be in the server's environment before huggingface_hub loads there.
    server = dmr_server_factory(HF_ENDPOINT=fake_hub.url)
    pulled = server.cli("pull", "hf.co/TestOrg/Server-GGUF:Q8_0")
    assert pulled.returncode == 0, pulled.stderr
    with server.client() as client:
        found = client.get(model_path("huggingface.co/testorg/server-gguf:Q8_0"))
    assert found.status_code == 200, found.text
    assert found.json()["tags"] == ["huggingface.co/testorg/server-gguf:Q8_0"]
    assert "m-Q4_K_M.gguf" not in fake_hub.downloads()
    assert os.path.basename(fake_hub.downloads()[-1]) == "m-Q8_0.gguf"


def test_cli_without_a_server_says_so_in_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, MODEL_RUNNER_HOST="http://127.0.0.1:9", HOME=str(tmp_path))
    for command in ("pull", "push"):
        done = subprocess.run(
            [sys.executable, "-m", "dmr", command, "ai/smollm2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1
        assert "cannot reach the dmr server" in done.stderr
        assert "Traceback" not in done.stderr


class _PullEndpoint(http.server.BaseHTTPRequestHandler):
    """A stand-in for the server's `POST /models/create`: notes which modules the CLI
    had imported when the request came (a file its import hook appends to), then
    answers one layer's progress and success."""

    imports_log: Path
    imported_before_request: list[str]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).imported_before_request = self.imports_log.read_text().split()
        lines = [
            {"type": "progress", "layer": {"id": "sha256:" + "a" * 64, "size": 10, "current": 10}},
            {"type": "success", "message": "Model pulled successfully"},
        ]
        body = "".join(json.dumps(line) + "\n" for line in lines).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_pull_sends_its_request_before_it_loads_the_progress_bars(tmp_path: Path) -> None:
    # The server starts the transfer while the CLI loads rich (tens of ms), not after.
    imports_log = tmp_path / "imports"
    imports_log.write_text("")
    _PullEndpoint.imports_log = imports_log
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PullEndpoint)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    script = (
        "import sys\n"
        f"log = open({str(imports_log)!r}, 'a', buffering=1)\n"
        "sys.addaudithook(lambda event, args: event == 'import' and log.write(args[0] + '\\n'))\n"
        "from dmr.cli.main import main\n"
        "sys.argv = ['dmr', 'pull', 'registry.example/org/model:v1']\n"
        "main()\n"
    )
    env = dict(os.environ, MODEL_RUNNER_HOST=f"http://127.0.0.1:{server.server_port}")
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    assert "Model pulled successfully" in done.stdout
    before = _PullEndpoint.imported_before_request
    assert "dmr.cli.client" in before  # the hook saw the pull command's imports
    assert not [name for name in before if name.split(".")[0] == "rich"], before
    assert "rich.progress" in imports_log.read_text().split()  # the bars were drawn after
