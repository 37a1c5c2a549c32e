"""The media types of model artifacts (docs/compatibility.md §2): names only, imported by
the store, distribution and packaging, and by the built-in formats plugin (dmr.formats)."""

from __future__ import annotations

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
