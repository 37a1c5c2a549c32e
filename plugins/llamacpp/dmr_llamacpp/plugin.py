"""Entry point of the llama.cpp engine plugin (`[project.entry-points.dmr] llamacpp`)."""

from __future__ import annotations

from collections.abc import Sequence

from dmr.sdk import EngineSpec, Mode, hookimpl

from dmr_llamacpp.engine import LlamaCppEngine
from dmr_llamacpp.settings import ALLOWED_RUNTIME_FLAGS

__all__ = ["ENGINE_NAME", "dmr_engines"]

ENGINE_NAME = "llama.cpp"


@hookimpl
def dmr_engines() -> Sequence[EngineSpec]:
    return [
        EngineSpec(
            name=ENGINE_NAME,
            formats=frozenset({"gguf"}),
            modes=frozenset({Mode.COMPLETION, Mode.EMBEDDING, Mode.RERANKING}),
            engine=LlamaCppEngine(),
            allowed_flags=ALLOWED_RUNTIME_FLAGS,
            # GPU kinds need a llama-cpp-python built for them (docs/scheduler.md).
            device_kinds=frozenset({"cpu", "cuda", "rocm", "metal", "vulkan"}),
        )
    ]
