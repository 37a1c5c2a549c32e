"""Helpers for the llama.cpp plugin tests (a uniquely named module: plugins share `conftest`)."""

from __future__ import annotations

from pathlib import Path

from dmr import testing
from dmr.records import AcceleratorInfo, Mode, RunnerLaunch
from dmr.testing import CPU, short_socket
from dmr_llamacpp.engine import LlamaCppEngine

__all__ = ["CPU", "RunnerProcess", "make_bundle", "make_launch", "short_socket"]


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
    parallel: int | None = 8,  # None: the engine sizes the slots
    runtime_flags: tuple[str, ...] = (),
    device: AcceleratorInfo = CPU,
) -> RunnerLaunch:
    return testing.make_launch(
        bundle,
        socket_path,
        mode=mode,
        model_name="ai/smollm2:latest",
        device=device,
        context_size=context_size,
        runtime_flags=runtime_flags,
        engine_options={} if parallel is None else {"llamacpp": {"parallel": parallel}},
    )


class RunnerProcess(testing.RunnerProcess):
    """The llama.cpp runner subprocess, started as the scheduler starts it."""

    def __init__(self, launch: RunnerLaunch, *, wait: bool = True) -> None:
        super().__init__(LlamaCppEngine(), launch, wait=wait)
