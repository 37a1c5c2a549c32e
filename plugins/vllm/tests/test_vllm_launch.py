"""`dmr_vllm.launch`: vLLM and everything it started go when the server or the core says so.

A fake "vLLM server" module stands in for vLLM: it starts a grandchild that
ignores SIGTERM (as vLLM's engine core outlives a killed API server) and
records both PIDs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

FAKE_SERVER = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    out = os.environ["FAKE_PIDS"]
    with open(out + ".tmp", "w") as handle:
        handle.write(f"{os.getpid()} {grandchild.pid}")
    os.replace(out + ".tmp", out)
    mode = os.environ.get("FAKE_MODE", "")
    if mode == "exit":
        time.sleep(0.5)
        sys.exit(3)
    if mode == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)
    """
)


def _launcher_code(module: str, parent: str) -> str:
    return (
        "import sys; from dmr_vllm.launch import main\n"
        f"sys.exit(main(['--parent-pid', str({parent}), '--', '--uds', 'x'], module={module!r}))\n"
    )


@pytest.fixture
def fake_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "fake_vllm_server.py").write_text(FAKE_SERVER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env["FAKE_PIDS"] = str(tmp_path / "pids")
    return env


def _pids(env: dict[str, str], timeout: float = 30) -> list[int]:
    path = Path(env["FAKE_PIDS"])
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the fake vLLM server never started"
        time.sleep(0.05)
    return [int(pid) for pid in path.read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [pid for pid in pids if _alive(pid)]
        if not left:
            return []
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


@pytest.fixture
def cleanup() -> Iterator[list[int]]:
    """PIDs to SIGKILL after the test whatever happened (nothing may be left running)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigkilled_server_takes_vllm_and_its_children(
    fake_env: dict[str, str], cleanup: list[int]
) -> None:
    # A stand-in for `dmr serve`: starts the launcher, then is SIGKILLed.
    launcher_code = _launcher_code("fake_vllm_server", "__import__('os').getppid()")
    server_code = (
        "import os, subprocess, sys, time\n"
        f"code = {launcher_code!r}\n"
        "launcher = subprocess.Popen([sys.executable, '-c', code])\n"
        "print(launcher.pid, flush=True); time.sleep(600)\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", server_code], env=fake_env, stdout=subprocess.PIPE, text=True
    )
    cleanup.append(server.pid)
    assert server.stdout is not None
    launcher = int(server.stdout.readline())
    cleanup.append(launcher)
    fake, grandchild = _pids(fake_env)
    cleanup += [fake, grandchild]
    server.kill()
    server.wait()
    assert _wait_gone([launcher, fake, grandchild], timeout=15) == []


def test_sigterm_stops_a_stubborn_vllm_within_the_core_grace(
    fake_env: dict[str, str], cleanup: list[int]
) -> None:
    env = {**fake_env, "FAKE_MODE": "ignore"}
    launcher = subprocess.Popen(
        [sys.executable, "-c", _launcher_code("fake_vllm_server", "__import__('os').getppid()")],
        env=env,
    )
    fake, grandchild = _pids(env)
    cleanup += [launcher.pid, fake, grandchild]
    started = time.monotonic()
    launcher.terminate()
    launcher.wait(timeout=10)
    # RunnerProcess.stop SIGKILLs after 5 s; the launcher is done before that.
    assert time.monotonic() - started < 5.0
    assert _wait_gone([fake, grandchild], timeout=5) == []


def test_vllm_exit_code_is_kept_and_leftovers_are_killed(
    fake_env: dict[str, str], cleanup: list[int]
) -> None:
    env = {**fake_env, "FAKE_MODE": "exit"}
    launcher = subprocess.Popen(
        [sys.executable, "-c", _launcher_code("fake_vllm_server", "__import__('os').getppid()")],
        env=env,
    )
    fake, grandchild = _pids(env)
    cleanup += [launcher.pid, fake, grandchild]
    assert launcher.wait(timeout=20) == 3
    # The grandchild lost its parent; the launcher, a subreaper, ended it.
    assert _wait_gone([grandchild], timeout=5) == []


def test_launcher_refuses_to_start_for_a_dead_parent(fake_env: dict[str, str]) -> None:
    # PID 1 is never our parent here: as if the server died before the launcher ran.
    code = _launcher_code("fake_vllm_server", "1")
    result = subprocess.run([sys.executable, "-c", code], env=fake_env, timeout=30)
    assert result.returncode == 1
    assert not Path(fake_env["FAKE_PIDS"]).exists()
