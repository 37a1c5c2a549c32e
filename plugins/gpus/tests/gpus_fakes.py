"""FAKES of GPU tools and libraries for the probe tests (no such GPU here):
recorded outputs served by scripts named like the real tools, and modules with the
functions of `nvidia-ml-py` and `amdsmi` that the probes call. See recorded/README.md."""

from __future__ import annotations

import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

RECORDED = Path(__file__).parent / "recorded"
GiB = 1 << 30


def write_fake_tool(
    folder: Path,
    name: str,
    *,
    recorded: str | None = None,
    stdout: str = "",
    stderr: str = "",
    exit_code: int = 0,
) -> Path:
    """A FAKE `name` in `folder` (put that folder first on PATH): it prints a recorded
    output (or `stdout`), then `stderr`, and exits with `exit_code`."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["#!/bin/sh", f"# FAKE {name} for dmr's GPU probe tests: replays a recorded output."]
    if recorded is not None:
        lines.append(f"cat {shlex.quote(str(RECORDED / recorded))}")
    if stdout:
        lines.append(f"printf '%s' {shlex.quote(stdout)}")
    if stderr:
        lines.append(f"printf '%s' {shlex.quote(stderr)} >&2")
    lines.append(f"exit {exit_code}")
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@dataclass
class FakeGpu:
    name: str
    total: int
    used: int


def fake_pynvml(
    gpus: list[FakeGpu], *, driver_present: bool = True, fail_on: str = ""
) -> ModuleType:
    """A FAKE `pynvml` (nvidia-ml-py): `fail_on` names a call that raises NVMLError."""
    module = ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def call(name: str, value: Any) -> Any:
        if name == fail_on:
            raise NVMLError(f"Unknown Error ({name})")
        return value

    def init() -> None:
        if not driver_present:
            raise NVMLError("NVML Shared Library Not Found")

    module.NVMLError = NVMLError  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    module.nvmlSystemGetDriverVersion = lambda: call("driver", "550.54.15")  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: call("count", len(gpus))  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda gpu: gpu.name  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda gpu: call(  # type: ignore[attr-defined]
        "memory", SimpleNamespace(total=gpu.total, free=gpu.total - gpu.used, used=gpu.used)
    )
    return module


def fake_amdsmi(
    gpus: list[FakeGpu], *, driver_present: bool = True, fail_on: str = ""
) -> ModuleType:
    """A FAKE `amdsmi` (AMD SMI's Python library), the calls and shapes its
    py-interface documents: memory in bytes, asic info and driver info as dicts."""
    module = ModuleType("amdsmi")

    class AmdSmiException(Exception):
        pass

    class AmdSmiLibraryException(AmdSmiException):
        pass

    class AmdSmiMemoryType:
        VRAM = 0
        VIS_VRAM = 1
        GTT = 2

    def call(name: str, value: Any) -> Any:
        if name == fail_on:
            raise AmdSmiLibraryException(f"Error code: 2 | AMDSMI_STATUS_NOT_SUPPORTED ({name})")
        return value

    def init() -> None:
        if not driver_present:
            raise AmdSmiLibraryException("Error code: 34 | AMDSMI_STATUS_DRIVER_NOT_LOADED")

    module.AmdSmiException = AmdSmiException  # type: ignore[attr-defined]
    module.AmdSmiLibraryException = AmdSmiLibraryException  # type: ignore[attr-defined]
    module.AmdSmiMemoryType = AmdSmiMemoryType  # type: ignore[attr-defined]
    module.amdsmi_init = init  # type: ignore[attr-defined]
    module.amdsmi_shut_down = lambda: None  # type: ignore[attr-defined]
    module.amdsmi_get_processor_handles = lambda: call("handles", list(gpus))  # type: ignore[attr-defined]
    module.amdsmi_get_gpu_memory_total = lambda gpu, kind: call("total", gpu.total)  # type: ignore[attr-defined]
    module.amdsmi_get_gpu_memory_usage = lambda gpu, kind: call("usage", gpu.used)  # type: ignore[attr-defined]
    module.amdsmi_get_gpu_asic_info = lambda gpu: {  # type: ignore[attr-defined]
        "market_name": gpu.name,
        "vendor_id": 0x1002,
        "target_graphics_version": "gfx942",
    }
    module.amdsmi_get_gpu_driver_info = lambda gpu: call(  # type: ignore[attr-defined]
        "driver", {"driver_name": "amdgpu", "driver_version": "6.8.5", "driver_date": "2015/01/01"}
    )
    return module
