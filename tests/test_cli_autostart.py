"""The CLI starts `dmr serve` when none answers, and `start/stop/restart-runner`.

Real processes throughout: each test has its own store and unix socket, and stops
every server it caused to start (`dmr stop-runner`, then a kill as a safety net).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.fixtures.server import free_port
from tests.fixtures.store import package_smollm2

STARTED = re.compile(r"Started the dmr server \(pid (\d+), log: ([^)]+)\)")


def _exited(pid: int) -> bool:
    # Zombies count as gone: a detached server is reaped by whoever adopted it.
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _is_dmr_serve(cmdline: list[str]) -> bool:
    # `python -m dmr serve`, or the `dmr` script's `python .../dmr serve`
    return len(cmdline) >= 2 and cmdline[-1] == "serve" and Path(cmdline[-2]).name == "dmr"


@dataclass
class Sandbox:
    """A store and socket of this test's own, and the environment naming them."""

    models_path: Path
    socket_path: Path
    env: dict[str, str]

    @property
    def pid_file(self) -> Path:
        return Path(f"{self.socket_path}.pid")

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dmr", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def processes(self) -> list[psutil.Process]:
        """Live processes started with this store: servers and their runners."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get("MODELS_PATH") == str(self.models_path) and not _exited(
                    process.pid
                ):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def servers(self) -> list[int]:
        """Pids of the live `dmr serve` processes on this store."""
        pids = []
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                if _is_dmr_serve(process.cmdline()):
                    pids.append(process.pid)
        return pids

    def kill_everything(self) -> None:
        pids = {process.pid for process in self.processes()}
        with contextlib.suppress(OSError, ValueError):
            pids.add(int(self.pid_file.read_text().split()[0]))
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).environ().get("MODELS_PATH") == str(self.models_path):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    # A short directory: a unix socket's path must fit in about 100 bytes.
    socket_dir = Path(tempfile.mkdtemp(prefix="dmr-as-", dir="/tmp"))
    elsewhere = {
        "DMR_NO_AUTOSTART",
        "MODEL_RUNNER_HOST",
        "MODEL_RUNNER_PORT",
        "MODEL_RUNNER_LOG_DIR",
    }
    env = {key: value for key, value in os.environ.items() if key not in elsewhere}
    env.update(
        MODELS_PATH=str(tmp_path / "models"),
        MODEL_RUNNER_SOCK=str(socket_dir / "dmr.sock"),
        DOCKER_CONFIG=str(tmp_path / "docker-config"),
        COLUMNS="200",
    )
    box = Sandbox(tmp_path / "models", socket_dir / "dmr.sock", env)
    try:
        yield box
    finally:
        box.kill_everything()
        shutil.rmtree(socket_dir, ignore_errors=True)


def _started_pid(stderr: str) -> int:
    found = STARTED.findall(stderr)
    assert len(found) == 1, stderr
    return int(found[0][0])


def _assert_stopped(box: Sandbox, pid: int) -> None:
    stopped = box.cli("stop-runner")
    assert stopped.returncode == 0, stopped.stderr
    assert f"Stopped the dmr server (pid {pid})" in stopped.stdout
    assert _exited(pid)
    assert not box.pid_file.exists()
    assert box.processes() == [], "processes of this store are left"


@pytest.mark.llama
@pytest.mark.slow
def test_run_starts_the_server_and_the_next_command_reuses_it(
    sandbox: Sandbox, smollm2_gguf: Path
) -> None:
    package_smollm2(sandbox.models_path, smollm2_gguf)
    assert sandbox.servers() == []
    # The server started here inherits this: a sampled answer stops at 64 tokens, not
    # at the context size (minutes on a loaded machine).
    sandbox.env["LLAMA_ARGS"] = "-n 64"

    ran = sandbox.cli("run", "ai/smollm2", "What is the capital of France?")

    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip(), "the model printed nothing"
    pid = _started_pid(ran.stderr)
    assert "`dmr stop-runner` stops it" in ran.stderr
    log_path = Path(STARTED.findall(ran.stderr)[0][1])
    assert log_path == sandbox.models_path / "logs" / "server-output.log"
    assert log_path.exists()
    assert sandbox.pid_file.read_text().split() == [str(pid)]
    assert sandbox.servers() == [pid]

    listed = sandbox.cli("ls")
    assert listed.returncode == 0, listed.stderr
    assert "ai/smollm2" in listed.stdout
    assert "Started" not in listed.stderr
    assert sandbox.servers() == [pid]

    _assert_stopped(sandbox, pid)  # the llama runner the model loaded goes with it


def test_two_commands_racing_leave_one_server(sandbox: Sandbox) -> None:
    racers = [
        subprocess.Popen(
            [sys.executable, "-m", "dmr", command],
            env=sandbox.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in ("ls", "start-runner")
    ]
    outputs = [racer.communicate(timeout=120) for racer in racers]

    for racer, (stdout, stderr) in zip(racers, outputs, strict=True):
        assert racer.returncode == 0, stdout + stderr
    started = [STARTED.findall(stderr) for _, stderr in outputs]
    assert sum(len(lines) for lines in started) == 1, outputs
    pid = _started_pid("".join(stderr for _, stderr in outputs))
    assert sandbox.servers() == [pid]

    again = sandbox.cli("start-runner")
    assert again.returncode == 0, again.stderr
    assert f"already running (pid {pid})" in again.stdout
    _assert_stopped(sandbox, pid)


@pytest.mark.parametrize("stale", ["dead pid", "unrelated process"])
def test_a_stale_pid_file_is_replaced(sandbox: Sandbox, stale: str) -> None:
    other = subprocess.Popen(["sleep", "0" if stale == "dead pid" else "120"])
    try:
        if stale == "dead pid":
            other.wait(timeout=10)
            # A killed server also leaves its socket file: nothing listens on it.
            with socket.socket(socket.AF_UNIX) as listener:
                listener.bind(str(sandbox.socket_path))
        sandbox.pid_file.write_text(f"{other.pid}\n")

        listed = sandbox.cli("ls")

        assert listed.returncode == 0, listed.stderr
        pid = _started_pid(listed.stderr)
        assert pid != other.pid
        assert sandbox.pid_file.read_text().split() == [str(pid)]
        assert sandbox.servers() == [pid]
        if stale == "unrelated process":
            assert other.poll() is None, "the unrelated process was touched"
        _assert_stopped(sandbox, pid)
        if stale == "unrelated process":
            assert other.poll() is None, "stop-runner touched the unrelated process"
    finally:
        other.kill()
        other.wait(timeout=10)


def _answers(socket_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(socket_path))
        except OSError:
            return False
    return True


def test_restart_runner_replaces_a_server_started_by_hand(sandbox: Sandbox) -> None:
    log = (sandbox.models_path.parent / "by-hand.log").open("wb")
    by_hand = subprocess.Popen(
        [sys.executable, "-m", "dmr", "serve"],
        env=sandbox.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _answers(sandbox.socket_path):
            assert by_hand.poll() is None and time.monotonic() < deadline, "dmr serve failed"
            time.sleep(0.2)
        # `dmr serve` wrote its own pid file, so the CLI knows it.
        assert sandbox.pid_file.read_text().split() == [str(by_hand.pid)]
        already = sandbox.cli("start-runner")
        assert f"already running (pid {by_hand.pid})" in already.stdout, already.stderr

        restarted = sandbox.cli("restart-runner")

        assert restarted.returncode == 0, restarted.stderr
        assert f"Stopped the dmr server (pid {by_hand.pid})" in restarted.stdout
        assert by_hand.wait(timeout=5) == 0  # SIGTERM: a clean exit
        pid = _started_pid(restarted.stderr)
        assert pid != by_hand.pid
        assert sandbox.servers() == [pid]
        _assert_stopped(sandbox, pid)
    finally:
        log.close()
        if by_hand.poll() is None:
            os.killpg(by_hand.pid, signal.SIGKILL)
            by_hand.wait(timeout=10)


def test_stop_runner_without_a_server_says_so_and_starts_nothing(sandbox: Sandbox) -> None:
    stopped = sandbox.cli("stop-runner")
    assert stopped.returncode == 0, stopped.stderr
    assert "No dmr server is running" in stopped.stdout
    assert sandbox.servers() == []
    assert not sandbox.socket_path.exists()


def _assert_refused(result: subprocess.CompletedProcess[str], box: Sandbox) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.match(r"error: ", result.stderr, re.IGNORECASE), result.stderr
    assert "Traceback" not in result.stderr
    assert "Started" not in result.stderr
    assert box.servers() == []
    assert not box.pid_file.exists()


def test_no_autostart_variable_turns_it_off(sandbox: Sandbox) -> None:
    sandbox.env["DMR_NO_AUTOSTART"] = "1"
    for command in ("ls", "ps"):
        refused = sandbox.cli(command)
        _assert_refused(refused, sandbox)
        assert "cannot reach the dmr server" in refused.stderr
    listed = sandbox.cli("ls")
    assert "DMR_NO_AUTOSTART is set" in listed.stderr
    assert str(sandbox.socket_path) in listed.stderr


def test_model_runner_host_elsewhere_starts_nothing(sandbox: Sandbox) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sandbox.env["MODEL_RUNNER_HOST"] = url
    for command in ("ls", "start-runner"):
        refused = sandbox.cli(command)
        _assert_refused(refused, sandbox)
        assert f"cannot reach the dmr server at {url}: MODEL_RUNNER_HOST is set" in refused.stderr


def test_a_json_call_starts_the_server_quietly(sandbox: Sandbox) -> None:
    """Docker Compose parses `ls --json` with stderr and stdout together: no message."""
    listed = sandbox.cli("ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == "" and json.loads(listed.stdout) == []
    [pid] = sandbox.servers()
    _assert_stopped(sandbox, pid)
