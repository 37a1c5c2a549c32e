"""Helpers for the diffusers plugin tests (a uniquely named module: plugins share `conftest`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx
from dmr.records import AcceleratorInfo, Mode, RunnerConfig, RunnerLaunch
from dmr_diffusers.engine import DiffusersEngine

CPU = AcceleratorInfo(name="cpu", kind="cpu", index=0, total_memory=8 << 30, free_memory=8 << 30)
GPU = AcceleratorInfo(
    name="NVIDIA H100", kind="cuda", index=1, total_memory=80 << 30, free_memory=80 << 30
)


def make_bundle(root: Path, model: Path) -> Path:
    """A store-shaped bundle: `model/model.dduf`, or `model/` = the diffusers directory."""
    bundle = root / ("bundle-dduf" if model.is_file() else "bundle-dir")
    if not bundle.exists():
        bundle.mkdir(parents=True)
        if model.is_file():
            (bundle / "model").mkdir()
            (bundle / "model" / "model.dduf").symlink_to(model)
        else:
            (bundle / "model").symlink_to(model, target_is_directory=True)
    return bundle


def short_socket() -> Path:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp paths can be longer.
    return Path(tempfile.mkdtemp(prefix="dmr-diff-")) / "runner.sock"


def make_launch(
    bundle: Path,
    socket_path: Path,
    *,
    mode: Mode = Mode.IMAGE_GENERATION,
    device: AcceleratorInfo = CPU,
    runtime_flags: tuple[str, ...] = (),
) -> RunnerLaunch:
    return RunnerLaunch(
        model_id="sha256:" + "0" * 64,
        model_name="ai/tiny-sd:latest",
        bundle_dir=bundle,
        model_config={"format": "diffusers"},
        mode=mode,
        socket_path=socket_path,
        config=RunnerConfig(runtime_flags=runtime_flags),
        device=device,
    )


class RunnerProcess:
    """The real runner subprocess, started as the scheduler starts it."""

    def __init__(self, launch: RunnerLaunch, *, wait: bool = True) -> None:
        command = DiffusersEngine().runner_command(launch)
        self.socket_path = launch.socket_path
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115  (closed in stop())
        self.process = subprocess.Popen(
            list(command.argv), env={**os.environ, **command.env}, stdout=self.log, stderr=self.log
        )
        if wait:
            self.wait_healthy(command.startup_timeout)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"runner exited: {self.output()[-2000:]}")
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

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)
