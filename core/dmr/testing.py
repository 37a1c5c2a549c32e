"""Helpers for testing an engine plugin against its real runner subprocess.

Public for plugin authors: build a `RunnerLaunch` with `make_launch`, start the
engine's runner with `RunnerProcess` (as the scheduler starts it, then waiting for
`GET /health` to answer 200) and talk to it over its unix socket with `client()`
or `async_client()`; `sample_gguf()` is a small real chat model to load. No pytest
dependency: wrap these in your own fixtures.

    launch = make_launch(bundle_dir, short_socket(), mode=Mode.COMPLETION)
    runner = RunnerProcess(MyEngine(), launch)
    try:
        assert runner.client().get("/v1/models").status_code == 200
    finally:
        runner.stop()
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import httpx

from dmr.records import AcceleratorInfo, Engine, Mode, RunnerConfig, RunnerLaunch
from dmr.sample_model import ensure_smollm2_gguf

__all__ = [
    "CPU",
    "REQUEST_TIMEOUT_S",
    "RunnerProcess",
    "free_port",
    "make_launch",
    "sample_gguf",
    "short_socket",
    "stop_process",
    "wait_for_health",
]

CPU = AcceleratorInfo(name="cpu", kind="cpu", index=0, total_memory=8 << 30, free_memory=8 << 30)

# How long the clients here wait for an answer. Generous: a CI machine of two cores
# running two test workers made one 40-token answer wait past 120 s (llama.cpp's
# threads spin at every barrier, and two spinning thread pools on two cores wait a
# scheduler slice each time). A test's own bound is pytest's timeout; a hang still fails.
REQUEST_TIMEOUT_S = 600.0

# Directories `short_socket` makes; `RunnerProcess.stop` removes them with the socket.
_SOCKET_DIR_PREFIX = "dmr-test-sock-"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def short_socket(name: str = "runner") -> Path:
    """A socket path in a fresh temporary directory.

    AF_UNIX paths are limited to about 107 bytes, and pytest's tmp paths can be longer.
    """
    return Path(tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX)) / f"{name}.sock"


def sample_gguf() -> Path:
    """The sample model's GGUF (SmolLM2-135M-Instruct, Q4_1, about 100 MB): a real chat
    model small enough for CPU tests, fetched once into ~/.cache/dmr (safe across
    processes, so parallel test workers share one download)."""
    return ensure_smollm2_gguf()


def make_launch(
    bundle_dir: Path,
    socket_path: Path,
    *,
    mode: Mode = Mode.COMPLETION,
    model_name: str = "ai/test:latest",
    model_config: dict[str, Any] | None = None,
    device: AcceleratorInfo = CPU,
    draft_bundle_dir: Path | None = None,
    **config: Any,
) -> RunnerLaunch:
    """A launch as the scheduler builds it; `config` holds `RunnerConfig` fields."""
    return RunnerLaunch(
        model_id="sha256:" + "0" * 64,
        model_name=model_name,
        bundle_dir=bundle_dir,
        model_config=model_config or {},
        mode=mode,
        socket_path=socket_path,
        config=RunnerConfig(**config),
        device=device,
        draft_bundle_dir=draft_bundle_dir,
    )


def wait_for_health(
    socket_path: Path, timeout: float = 120.0, *, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll the runner on `socket_path` until `GET /health` answers 200.

    Raises `RuntimeError` when `process` (the runner, if given) exits first or
    `timeout` seconds pass.
    """
    transport = httpx.HTTPTransport(uds=str(socket_path))
    deadline = time.monotonic() + timeout
    with httpx.Client(transport=transport, base_url="http://runner", timeout=5) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"runner exited with status {process.returncode}")
            try:
                if client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"runner did not become healthy in {timeout:.0f} s")


def stop_process(process: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM `process`, SIGKILL it after `grace` seconds, and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class RunnerProcess:
    """An engine's real runner subprocess for `launch`, its output kept for failures."""

    def __init__(
        self,
        engine: Engine,
        launch: RunnerLaunch,
        *,
        wait: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        command = engine.runner_command(launch)
        self.argv = command.argv
        self.socket_path = launch.socket_path
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115  (closed in stop())
        self.process = subprocess.Popen(
            list(command.argv),
            env={**os.environ, **(env or {}), **command.env},
            cwd=command.cwd,
            stdout=self.log,
            stderr=self.log,
        )
        if wait:
            self.wait_healthy(command.startup_timeout)

    def output(self) -> str:
        """What the runner wrote to stdout and stderr so far."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_healthy(self, timeout: float = 120.0) -> None:
        """Wait until /health answers 200; stop the runner and raise if it never does."""
        try:
            wait_for_health(self.socket_path, timeout, process=self.process)
        except RuntimeError as error:
            output = self.output()[-2000:]
            self.stop()
            raise RuntimeError(f"{error}: {output}") from None

    def client(self, timeout: float = REQUEST_TIMEOUT_S) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        return httpx.Client(transport=transport, base_url="http://runner", timeout=timeout)

    def async_client(self, timeout: float = REQUEST_TIMEOUT_S) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket_path))
        return httpx.AsyncClient(transport=transport, base_url="http://runner", timeout=timeout)

    def stop(self) -> None:
        """Terminate the runner (kill it after 10 s), and remove a `short_socket` directory."""
        stop_process(self.process)
        self.log.close()
        if self.socket_path.parent.name.startswith(_SOCKET_DIR_PREFIX):
            shutil.rmtree(self.socket_path.parent, ignore_errors=True)
