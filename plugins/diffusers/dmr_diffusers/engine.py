"""The diffusers engine as the scheduler sees it: status, runner command, memory estimate.

This module runs inside `dmr serve`, which must never import torch or diffusers:
versions come from package metadata and sizes from the files on disk.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

from dmr.sdk import (
    AcceleratorInfo,
    EngineState,
    EngineStatus,
    MemoryEstimate,
    Mode,
    RunnerCommand,
    RunnerLaunch,
)

from dmr_diffusers.bundle import find_diffusers_bundle

__all__ = ["DiffusersEngine", "torch_device"]

# Activations, the VAE decode of a full-size image and torch's own allocations
# sit beside the weights; a fraction of the weights with a floor covers them.
MARGIN_FRACTION = 0.25
MARGIN_FLOOR_BYTES = 1 << 30
# Loading a multi-gigabyte pipeline from disk (and unpacking a DDUF) takes a while.
STARTUP_TIMEOUT_SECONDS = 600.0


def torch_device(device: AcceleratorInfo) -> str:
    """The torch device string for a probed accelerator (ROCm builds answer to "cuda")."""
    if device.kind in ("cuda", "rocm"):
        return f"cuda:{device.index}"
    if device.kind in ("metal", "mps"):
        return "mps"
    return "cpu"


class DiffusersEngine:
    """Starts `python -m dmr_diffusers.runner` per image model."""

    def status(self) -> EngineStatus:
        try:
            diffusers_version = version("diffusers")
        except PackageNotFoundError:
            return EngineStatus(EngineState.NOT_INSTALLED, "diffusers is not installed")
        try:
            torch_version = version("torch")
        except PackageNotFoundError:
            return EngineStatus(EngineState.NOT_INSTALLED, "torch is not installed")
        return EngineStatus(
            EngineState.RUNNING, f"diffusers {diffusers_version} (torch {torch_version})"
        )

    def runner_command(self, launch: RunnerLaunch) -> RunnerCommand:
        if launch.mode is not Mode.IMAGE_GENERATION:
            raise ValueError(f"diffusers cannot serve mode {launch.mode.value!r}")
        if launch.config.runtime_flags:
            raise ValueError("the diffusers engine takes no runtime flags")
        bundle = find_diffusers_bundle(launch.bundle_dir)
        argv = (
            sys.executable,
            "-m",
            "dmr_diffusers.runner",
            "--model",
            str(bundle.path),
            "--socket",
            str(launch.socket_path),
            "--device",
            torch_device(launch.device),
            "--served-model-name",
            launch.model_name,
            # A DDUF archive is unpacked here; the scheduler removes this folder
            # with the runner, so nothing is left behind even after a SIGKILL.
            "--work-dir",
            str(launch.socket_path.parent),
        )
        env = {
            # Everything is local: never let a library reach for the Hub.
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        return RunnerCommand(
            argv=argv,
            env=env,
            startup_timeout=STARTUP_TIMEOUT_SECONDS,
            cpu_share=launch.device.kind == "cpu",
        )

    def estimate_memory(self, launch: RunnerLaunch) -> MemoryEstimate:
        """Sum of the weight files plus a margin for activations and the runtime."""
        weights = find_diffusers_bundle(launch.bundle_dir).weight_bytes
        margin = max(MARGIN_FLOOR_BYTES, int(weights * MARGIN_FRACTION))
        return MemoryEstimate(device_bytes=weights + margin)
