"""Helpers for the llama.cpp plugin tests (a uniquely named module: plugins share `conftest`)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from dmr.records import AcceleratorInfo, Mode, RunnerConfig, RunnerLaunch
from dmr_llamacpp.engine import LlamaCppEngine

CPU = AcceleratorInfo(name="cpu", kind="cpu", index=0, total_memory=8 << 30, free_memory=8 << 30)


def make_bundle(root: Path, gguf: Path) -> Path:
    """A store-shaped bundle (`model/model.gguf`) that links to the cached weights."""
    bundle = root / "bundle"
    (bundle / "model").mkdir(parents=True, exist_ok=True)
    target = bundle / "model" / "model.gguf"
    if not target.exists():
        target.symlink_to(gguf)
    return bundle


def make_launch(
    bundle: Path,
    socket_path: Path,
    mode: Mode = Mode.COMPLETION,
    *,
    context_size: int | None = 512,
    parallel: int = 8,
    runtime_flags: tuple[str, ...] = (),
    device: AcceleratorInfo = CPU,
) -> RunnerLaunch:
    return RunnerLaunch(
        model_id="sha256:" + "0" * 64,
        model_name="ai/smollm2:latest",
        bundle_dir=bundle,
        model_config={},
        mode=mode,
        socket_path=socket_path,
        config=RunnerConfig(
            context_size=context_size,
            runtime_flags=runtime_flags,
            engine_options={"llamacpp": {"parallel": parallel}},
        ),
        device=device,
    )


class RunnerProcess:
    def __init__(self, launch: RunnerLaunch) -> None:
        command = LlamaCppEngine().runner_command(launch)
        self.argv = command.argv
        self.socket_path = launch.socket_path
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in stop())
        self.process = subprocess.Popen(
            list(command.argv), env={**os.environ, **command.env}, stdout=self.log, stderr=self.log
        )
        deadline = time.monotonic() + command.startup_timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    self.log.seek(0)
                    raise RuntimeError(f"runner exited: {self.log.read()[-2000:]!r}")
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("runner did not become healthy")

    def client(self, timeout: float = 120.0) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        return httpx.Client(transport=transport, base_url="http://runner", timeout=timeout)

    def async_client(self, timeout: float = 120.0) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket_path))
        return httpx.AsyncClient(transport=transport, base_url="http://runner", timeout=timeout)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
