"""The built-in model formats plugin: which media types carry each format, and the engine
tried first for it (docs/compatibility.md §2). Registered as `dmr.formats`."""

from __future__ import annotations

from collections.abc import Sequence

from dmr.hookspecs import hookimpl
from dmr.media_types import CNCF_GGUF, CNCF_SAFETENSORS, DDUF, GGUF, SAFETENSORS
from dmr.records import ModelFormat

BUILTIN_FORMATS: tuple[ModelFormat, ...] = (
    ModelFormat(name="gguf", media_types=(GGUF, CNCF_GGUF), preferred_engine="llama.cpp"),
    ModelFormat(
        name="safetensors",
        media_types=(SAFETENSORS, CNCF_SAFETENSORS),
        preferred_engine="vllm",
    ),
    ModelFormat(name="dduf", media_types=(DDUF,), preferred_engine="diffusers"),
    ModelFormat(name="diffusers", media_types=(), preferred_engine="diffusers"),
)


@hookimpl
def dmr_model_formats() -> Sequence[ModelFormat]:
    return BUILTIN_FORMATS
