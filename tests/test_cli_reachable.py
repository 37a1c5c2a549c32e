"""Reachable by default: `dmr serve` and the server the CLI starts listen on TCP
127.0.0.1:12434 (issue 27), `status --json` gives that endpoint, and a taken port
is one clear error that names its holder and how to choose another.

No test here binds 12434 itself: the suite runs in parallel and a CI machine may
run a Docker Model Runner there. The default is checked by the settings and the
bind they resolve to; every server started here gets a free port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from dmr.cli.autostart import client_address
from dmr.server.serve import hypercorn_config
from dmr.server_process import ServerProcess
from dmr.settings import DEFAULT_PORT, Settings
from dmr.testing import free_port

from tests.fixtures.server import DmrServer
from tests.fixtures.store import package_smollm2

ADDRESS_VARIABLES = (
    "MODEL_RUNNER_PORT",
    "MODEL_RUNNER_SOCK",
    "MODEL_RUNNER_BIND",
    "MODEL_RUNNER_HOST",
    "MODELS_PATH",
)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _processes_with(variable: str, value: str) -> list[psutil.Process]:
    """Live processes started with `variable=value`: a server and its runners."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get(variable) == value and _alive(process):
                found.append(process)
    return found


def _kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmr", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _wait_answers(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"no answer at {url}:\n{log.read_text(errors='replace')}")


@pytest.fixture
def fresh_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A user with nothing set: a HOME of its own (so the default store
    ~/.docker/models is new and empty), auto-start on, and only the port chosen
    (12434 may be taken here)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {*ADDRESS_VARIABLES, "DMR_NO_AUTOSTART", "MODEL_RUNNER_LOG_DIR"}
        and not key.startswith("XDG_")
        and key != "DOCKER_CONFIG"
    }
    env.update(HOME=str(home), MODEL_RUNNER_PORT=str(free_port()), COLUMNS="200")
    try:
        yield env
    finally:
        _kill(_processes_with("HOME", str(home)))  # a safety net for a failed test


# --------------------------------------------------------------------------- defaults


def test_with_nothing_set_the_server_listens_on_loopback_port_12434(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ADDRESS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))

    settings = Settings.from_env()

    assert DEFAULT_PORT == 12434
    assert (settings.host, settings.port, settings.socket_path) == ("127.0.0.1", 12434, None)
    assert hypercorn_config(settings).bind == ["127.0.0.1:12434"]
    assert client_address(settings).base_url == "http://127.0.0.1:12434"
    assert client_address(settings).socket_path is None
    pid_file = ServerProcess.for_settings(settings).pid_file
    assert pid_file == tmp_path / ".docker" / "models" / "dmr-serve-12434.pid"


def test_a_socket_alone_or_beside_the_port(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ADDRESS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    sock = tmp_path / "dmr.sock"
    monkeypatch.setenv("MODEL_RUNNER_SOCK", str(sock))

    alone = Settings.from_env()
    assert (alone.port, alone.socket_path) == (None, sock)
    assert hypercorn_config(alone).bind == [f"unix:{sock}"]
    assert client_address(alone).socket_path == sock

    monkeypatch.setenv("MODEL_RUNNER_PORT", "5555")
    monkeypatch.setenv("MODEL_RUNNER_BIND", "0.0.0.0")
    both = Settings.from_env()
    assert hypercorn_config(both).bind == ["0.0.0.0:5555", f"unix:{sock}"]
    # The CLI and `status --json` use the TCP address, which every client can be given.
    assert client_address(both).base_url == "http://127.0.0.1:5555"


def test_serve_help_names_the_default_address() -> None:
    helped = _cli(dict(os.environ), "serve", "--help", timeout=60)
    assert helped.returncode == 0, helped.stderr
    for flag in ("--host", "--port", "--socket", "--models-path", "12434", "127.0.0.1"):
        assert flag in helped.stdout


# --------------------------------------------------------------------------- dmr serve flags


def test_serve_flags_choose_the_port_the_socket_and_the_store(tmp_path: Path) -> None:
    port = free_port()
    store = tmp_path / "store"
    socket_dir = Path(tempfile.mkdtemp(prefix="dmr-rs-", dir="/tmp"))  # a short socket path
    sock = socket_dir / "dmr.sock"
    env = {k: v for k, v in os.environ.items() if k not in ADDRESS_VARIABLES}
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "dmr", "serve", "--port", str(port), "--socket", str(sock),
             "--models-path", str(store)],
            env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_answers(f"http://127.0.0.1:{port}/", server, log)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=10) as client:
            assert client.get("http://dmr/models").json() == []
        assert (store / f"dmr-serve-{port}.pid").read_text().split() == [str(server.pid)]

        # The commands find it with the same port and store; stop-runner stops it.
        cli_env = {**env, "MODEL_RUNNER_PORT": str(port), "MODELS_PATH": str(store)}
        status = _cli(cli_env, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["endpoint"] == f"http://127.0.0.1:{port}/engines/v1/"
        stopped = _cli(cli_env, "stop-runner")
        assert stopped.returncode == 0, stopped.stderr
        assert f"Stopped the dmr server (pid {server.pid})" in stopped.stdout
        assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        with contextlib.suppress(OSError):
            sock.unlink()
        socket_dir.rmdir()


# --------------------------------------------------------------------------- a taken port


def test_a_taken_port_names_its_holder_and_how_to_choose_another(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ADDRESS_VARIABLES}

        refused = _cli(env, "serve", "--port", str(port), "--models-path", str(tmp_path / "m"))

    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr.startswith(
        f"error: cannot listen on 127.0.0.1:{port}: the address is already in use"
        f" by pid {os.getpid()} ("
    ), refused.stderr
    assert "`dmr serve --port N`" in refused.stderr
    assert "MODEL_RUNNER_PORT=N" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "m" / f"dmr-serve-{port}.pid").exists()


def test_a_port_taken_by_a_dmr_server_says_so_and_keeps_its_pid_file(
    dmr_server: DmrServer,
) -> None:
    pid_file = dmr_server.models_path / f"dmr-serve-{dmr_server.port}.pid"
    assert pid_file.read_text().split() == [str(dmr_server.process.pid)]
    env = {k: v for k, v in dmr_server.env.items() if k != "MODEL_RUNNER_HOST"}

    second = _cli(env, "serve")  # the same store and port

    assert second.returncode == 1, second.stdout + second.stderr
    assert f"in use by pid {dmr_server.process.pid}" in second.stderr
    assert "a dmr server: `dmr stop-runner` stops it" in second.stderr
    # The running server's pid file still names it, so `dmr stop-runner` still works.
    assert pid_file.read_text().split() == [str(dmr_server.process.pid)]
    assert httpx.get(dmr_server.url + "/", timeout=10).status_code == 200


def test_a_command_whose_server_cannot_take_the_port_says_why(
    fresh_env: dict[str, str],
) -> None:
    """Something holds the port without answering on it: the CLI's probe finds nothing,
    starts a server, and reports the server's own reason from its log."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # bound, not listening: a connect is refused
        fresh_env["MODEL_RUNNER_PORT"] = str(holder.getsockname()[1])

        listed = _cli(fresh_env, "ls")

    assert listed.returncode == 1, listed.stdout + listed.stderr
    assert "exited with code 1 while starting" in listed.stderr
    assert f"cannot listen on 127.0.0.1:{fresh_env['MODEL_RUNNER_PORT']}" in listed.stderr
    assert "the address is already in use" in listed.stderr
    assert "MODEL_RUNNER_PORT=N" in listed.stderr


# --------------------------------------------------------------------------- status --json


def test_an_auto_started_server_is_reachable_at_the_endpoint_status_gives(
    fresh_env: dict[str, str],
) -> None:
    port = fresh_env["MODEL_RUNNER_PORT"]
    try:
        status = _cli(fresh_env, "status", "--json")

        assert status.returncode == 0, status.stderr
        assert status.stderr == ""  # Compose reads stdout and stderr together
        answer = json.loads(status.stdout)
        endpoint = f"http://127.0.0.1:{port}/engines/v1/"
        assert (answer["running"], answer["endpoint"], answer["endpointHost"]) == (
            True,
            endpoint,
            endpoint,
        )
        assert "socket" not in answer
        client = openai.OpenAI(base_url=answer["endpoint"], api_key="unused")
        assert client.models.list().data == []  # a fresh store
        store = Path(fresh_env["HOME"]) / ".docker" / "models"
        assert (store / f"dmr-serve-{port}.pid").exists()
    finally:
        stopped = _cli(fresh_env, "stop-runner")
    assert stopped.returncode == 0 and "Stopped the dmr server" in stopped.stdout, stopped.stderr


@pytest.mark.llama
@pytest.mark.slow
def test_fresh_store_run_then_the_openai_client_then_status(
    fresh_env: dict[str, str], smollm2_gguf: Path
) -> None:
    """The issue's sequence: `dmr run ai/smollm2 hello there` from a fresh store with
    nothing set (the port aside), then the official `openai` client at
    http://127.0.0.1:PORT/engines/v1, then `dmr status --json` gives that endpoint."""
    port = fresh_env["MODEL_RUNNER_PORT"]
    home = Path(fresh_env["HOME"])
    package_smollm2(home / ".docker" / "models", smollm2_gguf)  # what quickstart does
    fresh_env["LLAMA_ARGS"] = "-n 32"  # a sampled answer stops soon on a loaded machine
    try:
        ran = _cli(fresh_env, "run", "ai/smollm2", "hello", "there", timeout=300)

        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip(), "the model printed nothing"
        assert "Started the dmr server" in ran.stderr

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/engines/v1", api_key="unused")
        assert "ai/smollm2:latest" in [model.id for model in client.models.list().data]
        answer = client.chat.completions.create(
            model="ai/smollm2",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0,
        )
        assert answer.choices[0].message.content

        status = _cli(fresh_env, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["endpoint"] == f"http://127.0.0.1:{port}/engines/v1/"
    finally:
        stopped = _cli(fresh_env, "stop-runner", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert _processes_with("HOME", str(home)) == [], "stop-runner left processes behind"
