"""`docker model` flags dmr takes with Docker Model Runner's meaning, or the nearest one
for a local server (docs/compatibility.md §8): start-runner/restart-runner's runner
flags, `show --remote`, `package --format`, `bench --timeout`, `run --debug/--color/
--openaiurl`. Real CLI, real servers; the runner flags in a sandbox of their own."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.fixtures.registry import LocalRegistry
from tests.fixtures.server import DmrServer, free_port
from tests.fixtures.test_engine import add_test_model
from tests.test_cli_autostart import Sandbox, _exited, _started_pid, sandbox  # noqa: F401
from tests.test_cli_transfer import package_into

DMR = (sys.executable, "-m", "dmr")

# --------------------------------------------------------------------------- runner flags


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_start_runner_port_host_gpu_debug_backend(sandbox: Sandbox) -> None:  # noqa: F811
    port = free_port()
    started = sandbox.cli(
        "start-runner", "--port", str(port), "--host", "127.0.0.1", "--gpu", "none",
        "--debug", "--do-not-track", "--backend", "test-engine",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    pid = _started_pid(started.stderr)
    on_port = {**sandbox.env, "MODEL_RUNNER_PORT": str(port)}
    try:
        assert _answers(port)
        assert f"MODEL_RUNNER_PORT={port}" in started.stdout  # how later commands find it
        server_env = psutil.Process(pid).environ()
        # --gpu none: no GPU visible to the server and the runners it starts.
        assert server_env["CUDA_VISIBLE_DEVICES"] == "" == server_env["HIP_VISIBLE_DEVICES"]
        assert server_env["LOG_LEVEL"] == "DEBUG"
        assert server_env["MODEL_RUNNER_BIND"] == "127.0.0.1"

        # restart-runner takes the same flags: a new server on another port.
        other = free_port()
        restarted = subprocess.run(
            [*DMR, "restart-runner", "--port", str(other)],
            env=on_port, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert restarted.returncode == 0, restarted.stderr
        assert f"Stopped the dmr server (pid {pid})" in restarted.stdout
        new_pid = _started_pid(restarted.stderr)
        assert _exited(pid) and _answers(other) and not _answers(port)
        pid, port = new_pid, other
    finally:
        stopped = subprocess.run(
            [*DMR, "stop-runner"],
            env={**sandbox.env, "MODEL_RUNNER_PORT": str(port)},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert f"Stopped the dmr server (pid {pid})" in stopped.stdout, stopped.stderr


def test_start_runner_refuses_what_it_cannot_do(sandbox: Sandbox) -> None:  # noqa: F811
    musa = sandbox.cli("start-runner", "--gpu", "musa")
    assert musa.returncode != 0 and "no hardware probe or engine for MUSA" in musa.stderr
    assert sandbox.servers() == []  # refused before anything started
    bad_gpu = sandbox.cli("start-runner", "--gpu", "tpu")
    assert bad_gpu.returncode == 2 and "'tpu' is not one of" in bad_gpu.stderr

    unknown = sandbox.cli("start-runner", "--backend", "tensorrt")
    try:
        assert unknown.returncode != 0
        assert "--backend tensorrt: no such engine" in unknown.stderr
        assert "llama.cpp" in unknown.stderr  # the known ones are listed
    finally:
        assert sandbox.cli("stop-runner").returncode == 0


# --------------------------------------------------------------------------- models


@pytest.mark.registry
def test_show_remote_reads_the_registry(
    dmr_server_factory: object, oci_registry: LocalRegistry, tmp_path: Path
) -> None:
    server: DmrServer = dmr_server_factory(INSECURE_REGISTRY="true")  # type: ignore[operator]
    tag = f"{oci_registry.host}/tests/show-remote:v1"
    package_into(server, tmp_path, tag, payload=200_000)
    assert server.cli("push", tag).returncode == 0
    assert server.cli("rm", tag).returncode == 0

    local = server.cli("show", tag)
    remote = server.cli("show", "--remote", tag)

    assert local.returncode != 0 and "not found" in local.stderr.lower()
    assert remote.returncode == 0, remote.stderr
    assert tag in remote.stdout and "gguf" in remote.stdout
    assert server.cli("show", "-r", tag).stdout == remote.stdout


def test_package_format_cncf_writes_modelpack_that_dmr_reads(
    test_engine_server: DmrServer, tmp_path: Path
) -> None:
    """`--format cncf` writes DMR's CNCF ModelPack shape (artifactType, ModelPack config,
    raw layers with their file paths); the server stores it and builds the same bundle
    a Docker-format artifact gets."""
    from dmr.store import Store

    from tests.fixtures.hf_hub import tiny_gguf

    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(tiny_gguf("cncf-weights"))
    projector = tmp_path / "projector.gguf"
    projector.write_bytes(tiny_gguf("cncf-projector", architecture="clip"))
    template = tmp_path / "chat.jinja"
    template.write_text("{{ messages }}")
    license_file = tmp_path / "LICENSE"
    license_file.write_text("Apache-2.0")

    packaged = test_engine_server.cli(
        "package", "--gguf", str(gguf), "--mmproj", str(projector), "--chat-template",
        str(template), "-l", str(license_file), "--format", "cncf", "test/cncf:v1",
    )  # fmt: skip

    assert packaged.returncode == 0, packaged.stderr
    stored = Store.open(test_engine_server.models_path).get("test/cncf:v1")
    manifest = stored.manifest
    assert manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    kinds = {
        layer["annotations"]["org.cncf.model.filepath"]: layer["mediaType"]
        for layer in manifest["layers"]
    }
    assert kinds == {
        "weights.gguf": "application/vnd.cncf.model.weight.v1.raw",
        "mmproj-projector.gguf": "application/vnd.cncf.model.weight.v1.raw",
        "chat.jinja": "application/vnd.cncf.model.weight.config.v1.raw",
        "LICENSE": "application/vnd.cncf.model.doc.v1.raw",
    }
    files = sorted(path.name for path in (stored.bundle_dir / "model").iterdir())
    assert files == ["model.gguf", "model.mmproj", "template.jinja"]
    assert stored.format == "gguf" and stored.capabilities == ("vision",)
    with test_engine_server.client() as http:
        described = http.get("/models/test/cncf:v1").json()
    assert described["config"]["format"] == "gguf"
    assert described["config"]["architecture"] == "llama"

    sized = test_engine_server.cli(
        "package", "--gguf", str(gguf), "--context-size", "4096", "--format", "cncf", "x/y:1"
    )
    assert sized.returncode == 1 and "a CNCF ModelPack config has no context size" in (sized.stderr)
    odd = test_engine_server.cli("package", "--gguf", str(gguf), "--format", "oci", "x/y:1")
    assert odd.returncode == 2 and "'oci' is not one of 'docker', 'cncf'" in odd.stderr


# --------------------------------------------------------------------------- bench


def test_bench_timeout_counts_slow_requests_as_errors(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/bench")
    # "[slow]" streams with 0.4 s between chunks: a request takes well over 0.5 s.
    result = test_engine_server.cli(
        "bench", "test/bench", "--prompt", "[slow] one two three four five",
        "--concurrency", "1", "--duration", "1s", "--timeout", "0.5s", "--json",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    [level] = json.loads(result.stdout)["levels"]
    assert level["errors"] == level["requests"] >= 1
    assert "more than --timeout (0.5 s)" in level["first_error"]
    bad = test_engine_server.cli("bench", "test/bench", "--timeout", "soon")
    assert bad.returncode == 2 and "--timeout" in bad.stderr


# --------------------------------------------------------------------------- run


def test_run_debug_and_color(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/run-flags")

    plain = test_engine_server.cli("run", "test/run-flags", "**bold**", "words")
    debug = test_engine_server.cli("run", "--debug", "test/run-flags", "hi")
    colored = test_engine_server.cli("run", "--color", "yes", "test/run-flags", "**bold**")

    assert plain.stdout == "[1 messages] echo: **bold** words\n" and "\x1b[" not in plain.stdout
    assert "Running model test/run-flags with prompt hi" in debug.stderr
    assert debug.stdout == "[1 messages] echo: hi\n"
    # Streamed as it came, then shown rendered: the asterisks become bold (an escape).
    assert colored.stdout.startswith("[1 messages] echo: **bold**\n")
    assert "\x1b[1m" in colored.stdout and "bold" in colored.stdout.split("\n", 1)[1]
    auto = test_engine_server.cli("run", "--color", "auto", "test/run-flags", "x")
    assert "\x1b[" not in auto.stdout  # piped: no terminal, no colour
    refused = test_engine_server.cli("run", "--websearch", "test/run-flags", "x")
    assert refused.returncode != 0 and "no web search tool" in refused.stderr


def test_run_openaiurl_chats_with_another_server(
    test_engine_server: DmrServer, dmr_server_factory: object
) -> None:
    """`--openaiurl` goes to that endpoint as it is: here another dmr server's /engines/v1,
    while MODEL_RUNNER_HOST points at nothing (no pull, no start)."""
    add_test_model(test_engine_server.models_path, "test/elsewhere")
    env = {**test_engine_server.env, "MODEL_RUNNER_HOST": f"http://127.0.0.1:{free_port()}"}
    url = f"{test_engine_server.url}/engines/v1"

    answered = subprocess.run(
        [*DMR, "run", "--openaiurl", url, "--debug", "test/elsewhere", "hi"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    detached = subprocess.run(
        [*DMR, "run", "--openaiurl", url, "-d", "test/elsewhere"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    bad = subprocess.run(
        [*DMR, "run", "--openaiurl", "ftp://x", "test/elsewhere", "hi"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert answered.returncode == 0, answered.stderr
    assert answered.stdout == "[1 messages] echo: hi\n"
    assert f"OpenAI endpoint {url}/chat/completions" in answered.stderr
    assert detached.returncode != 0
    assert "--detach flag cannot be used with --openaiurl flag" in detached.stderr
    assert bad.returncode != 0 and "invalid OpenAI URL" in bad.stderr


def test_install_and_uninstall_runner_start_and_stop_the_server(sandbox: Sandbox) -> None:  # noqa: F811
    installed = sandbox.cli("install-runner")
    assert installed.returncode == 0, installed.stderr
    pid = _started_pid(installed.stderr)
    reinstalled = sandbox.cli("reinstall-runner")
    assert f"Stopped the dmr server (pid {pid})" in reinstalled.stdout, reinstalled.stderr
    pid = _started_pid(reinstalled.stderr)
    removed = sandbox.cli("uninstall-runner")
    assert f"Stopped the dmr server (pid {pid})" in removed.stdout, removed.stderr
    assert _exited(pid) and sandbox.servers() == []


def test_ls_openaiurl_lists_another_endpoint(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/listed-elsewhere")
    env = {**test_engine_server.env, "MODEL_RUNNER_HOST": f"http://127.0.0.1:{free_port()}"}
    url = f"{test_engine_server.url}/engines/v1"

    def ls(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*DMR, "ls", "--openaiurl", url, *args],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    table = ls()
    assert table.returncode == 0, table.stderr
    assert table.stdout.split()[:3] == ["MODEL", "NAME", "CREATED"]
    assert "test/listed-elsewhere" in table.stdout
    listed = json.loads(ls("--json").stdout)
    assert [m["id"] for m in listed["data"]] == ["test/listed-elsewhere:latest"]
    assert json.loads(ls("--json", "test/nothing-like-it").stdout)["data"] == []
    quiet = ls("-q")
    assert quiet.returncode == 1
    assert "--quiet flag cannot be used with --openaiurl flag" in quiet.stderr


@pytest.mark.llama
def test_a_cncf_packaged_smollm2_answers(
    dmr_server_factory: object, smollm2_gguf: Path, tmp_path: Path
) -> None:
    server: DmrServer = dmr_server_factory(LLAMA_ARGS="-n 8")  # type: ignore[operator]
    packaged = server.cli(
        "package", "--gguf", str(smollm2_gguf), "--format", "cncf", "test/cncf-smol"
    )
    assert packaged.returncode == 0, packaged.stderr

    answered = server.cli("run", "test/cncf-smol", "What is the capital of France?")

    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip()


@pytest.mark.registry
def test_cncf_artifacts_push_pull_and_lying_weights_are_refused(
    dmr_server_factory: object, oci_registry: LocalRegistry, tmp_path: Path
) -> None:
    """A CNCF-packaged model goes to a registry and back as it is; a ModelPack raw layer
    that claims to be GGUF weights (by its path) gets the GGUF header check on pull."""
    import hashlib

    import httpx
    from dmr.store import Store

    from tests.fixtures.hf_hub import tiny_gguf
    from tests.fixtures.registry import upload_artifact

    server: DmrServer = dmr_server_factory(INSECURE_REGISTRY="true")  # type: ignore[operator]
    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(tiny_gguf("cncf-round-trip"))
    tag = f"{oci_registry.host}/tests/cncf:v1"
    assert server.cli("package", "--gguf", str(gguf), "--format", "cncf", tag).returncode == 0
    pushed_id = Store.open(server.models_path).get(tag).id
    assert server.cli("push", tag).returncode == 0
    assert server.cli("rm", tag).returncode == 0
    pulled = server.cli("pull", tag)
    assert pulled.returncode == 0, pulled.stderr
    stored = Store.open(server.models_path).get(tag)
    assert stored.id == pushed_id and stored.format == "gguf"
    assert [p.name for p in (stored.bundle_dir / "model").iterdir()] == ["model.gguf"]

    # Raw bytes that say GGUF and lie about their tensor count.
    lying = b"GGUF" + (3).to_bytes(4, "little") + (2**40).to_bytes(8, "little") + bytes(8)
    config = json.dumps(
        {"descriptor": {"createdAt": "2026-01-01T00:00:00Z"},
         "modelfs": {"type": "layers", "diffIds": []}, "config": {"format": "gguf"}}
    ).encode()  # fmt: skip
    config_type = "application/vnd.cncf.model.config.v1+json"
    raw = "application/vnd.cncf.model.weight.v1.raw"
    upload_artifact(oci_registry, "tests/lying", "blobs", config_type, config, [(raw, lying)])

    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.cncf.model.manifest.v1+json",
        "config": {"mediaType": config_type, "digest": digest(config), "size": len(config)},
        "layers": [
            {"mediaType": raw, "digest": digest(lying), "size": len(lying),
             "annotations": {"org.cncf.model.filepath": "model.gguf"}},
        ],
    }  # fmt: skip
    put = httpx.put(
        f"{oci_registry.url}/v2/tests/lying/manifests/v1",
        content=json.dumps(manifest),
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    put.raise_for_status()

    refused = server.cli("pull", f"{oci_registry.host}/tests/lying:v1")

    assert refused.returncode != 0
    assert "GGUF weights" in refused.stderr and "unusable" in refused.stderr


def test_uninstall_runner_backend_goes_through_the_server(
    test_engine_server: DmrServer, dmr_server_factory: object
) -> None:
    installed = test_engine_server.cli("uninstall-runner", "--backend", "test-engine")
    assert installed.returncode == 1
    assert "failed to uninstall test-engine backend: backend uninstall failed" in installed.stderr
    assert "`pip uninstall dmr-test-engine`" in installed.stderr
    unknown = test_engine_server.cli("uninstall-runner", "--backend", "tensorrt")
    assert unknown.returncode == 1 and "backend not found: 'tensorrt'" in unknown.stderr

    without_vllm: DmrServer = dmr_server_factory(DMR_DISABLED_PLUGINS="vllm")  # type: ignore[operator]
    absent = without_vllm.cli("uninstall-runner", "--backend", "vllm")
    assert absent.returncode == 0, absent.stderr
    assert absent.stdout == "Uninstalled vllm backend\n"
    with without_vllm.client() as http:
        assert http.get("/").status_code == 200  # the server itself kept running
