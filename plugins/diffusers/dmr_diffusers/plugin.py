"""Entry point of the diffusers engine plugin (`[project.entry-points.dmr] diffusers`)."""

from __future__ import annotations

from collections.abc import Sequence

from dmr.sdk import EngineSpec, Mode, hookimpl

from dmr_diffusers.engine import DiffusersEngine

__all__ = ["ENGINE_NAME", "dmr_engines"]

ENGINE_NAME = "diffusers"


@hookimpl
def dmr_engines() -> Sequence[EngineSpec]:
    return [
        EngineSpec(
            name=ENGINE_NAME,
            formats=frozenset({"dduf", "diffusers"}),
            modes=frozenset({Mode.IMAGE_GENERATION}),
            engine=DiffusersEngine(),
            # torch_device() maps each: ROCm builds of torch answer to "cuda", Metal is "mps".
            device_kinds=frozenset({"cpu", "cuda", "rocm", "metal"}),
        )
    ]
