"""Built-in model formats and the media types that carry them (docs/compatibility.md §2)."""

from __future__ import annotations

from collections.abc import Sequence

from dmr.hookspecs import hookimpl
from dmr.records import ModelFormat

MEDIA_PREFIX = "application/vnd.docker.ai."
CONFIG_V01 = "application/vnd.docker.ai.model.config.v0.1+json"
CONFIG_V02 = "application/vnd.docker.ai.model.config.v0.2+json"
CONFIG_CNCF = "application/vnd.cncf.model.config.v1+json"
KNOWN_CONFIG_MEDIA_TYPES = frozenset({CONFIG_V01, CONFIG_V02, CONFIG_CNCF})

GGUF = MEDIA_PREFIX + "gguf.v3"
SAFETENSORS = MEDIA_PREFIX + "safetensors"
DDUF = MEDIA_PREFIX + "dduf"
LICENSE = MEDIA_PREFIX + "license"
MMPROJ = MEDIA_PREFIX + "mmproj"
CHAT_TEMPLATE = MEDIA_PREFIX + "chat.template.jinja"
MODEL_FILE = MEDIA_PREFIX + "model.file"
LEGACY_VLLM_CONFIG_TAR = MEDIA_PREFIX + "vllm.config.tar"
LEGACY_DIR_TAR = MEDIA_PREFIX + "dir.tar"
CNCF_GGUF = "application/vnd.cncf.model.weight.v1.gguf"
CNCF_SAFETENSORS = "application/vnd.cncf.model.weight.v1.safetensors"
# CNCF ModelPack's generic layer types (modelpack/model-spec specs-go/v1), which Docker
# Model Runner's `package --format cncf` writes; the file's path annotation says what
# each holds.
CNCF_WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
CNCF_WEIGHT_CONFIG_RAW = "application/vnd.cncf.model.weight.config.v1.raw"
CNCF_DOC_RAW = "application/vnd.cncf.model.doc.v1.raw"
CNCF_MANIFEST_ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
FILEPATH_ANNOTATION = "org.cncf.model.filepath"
# The largest manifest (or model config) read from a registry: the OCI distribution
# spec's 4 MiB. Here, not in the registry client, so the built-in OCI plugin can
# check configs without importing oras at server start.
MANIFEST_MAX_BYTES = 4 << 20

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
