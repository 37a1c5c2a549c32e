"""Helpers for the diffusers plugin tests (a uniquely named module: plugins share `conftest`)."""

from __future__ import annotations

from pathlib import Path

from dmr import testing
from dmr.records import AcceleratorInfo, Mode, RunnerLaunch
from dmr.testing import CPU, short_socket
from dmr_diffusers.engine import DiffusersEngine

__all__ = ["CPU", "GPU", "RunnerProcess", "make_bundle", "make_launch", "short_socket"]

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


def make_launch(
    bundle: Path,
    socket_path: Path,
    *,
    mode: Mode = Mode.IMAGE_GENERATION,
    device: AcceleratorInfo = CPU,
    runtime_flags: tuple[str, ...] = (),
) -> RunnerLaunch:
    return testing.make_launch(
        bundle,
        socket_path,
        mode=mode,
        model_name="ai/tiny-sd:latest",
        model_config={"format": "diffusers"},
        device=device,
        runtime_flags=runtime_flags,
    )


class RunnerProcess(testing.RunnerProcess):
    """The diffusers runner subprocess, started as the scheduler starts it."""

    def __init__(self, launch: RunnerLaunch, *, wait: bool = True) -> None:
        super().__init__(DiffusersEngine(), launch, wait=wait)
