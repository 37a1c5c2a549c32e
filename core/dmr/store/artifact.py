"""Reading OCI model artifacts: manifest validation and config normalisation.

Docker's v0.1/v0.2 configs are used as they are; a CNCF ModelPack config is
turned into the same shape, so the rest of dmr reads one kind of config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from dmr import media_types
from dmr.errors import InvalidRequestError, UnsupportedMediaTypeError
from dmr.store.layout import is_digest

__all__ = [
    "OCI_MANIFEST",
    "Layer",
    "format_for_layers",
    "layers_of",
    "modelpack_role",
    "normalise_config",
    "parse_manifest",
    "safe_relative_path",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str]

    @property
    def filepath(self) -> str | None:
        return self.annotations.get(media_types.FILEPATH_ANNOTATION)


def _descriptor(raw: object, where: str) -> Layer:
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"invalid manifest: {where} is not an object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise InvalidRequestError(f"invalid manifest: {where} has no mediaType")
    if not isinstance(digest, str) or not is_digest(digest):
        raise InvalidRequestError(f"invalid manifest: {where} has an invalid digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidRequestError(f"invalid manifest: {where} has an invalid size {size!r}")
    annotations = raw.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise InvalidRequestError(f"invalid manifest: {where} has invalid annotations")
    return Layer(media_type=media_type, digest=digest, size=size, annotations=annotations)


def _load_json(data: bytes, what: str, max_bytes: int, max_words: str) -> Any:
    """`data` decoded, or an `InvalidRequestError` naming `what` for a document over
    `max_bytes` or one that is no JSON."""
    if len(data) > max_bytes:
        raise InvalidRequestError(f"invalid {what}: larger than {max_words}")
    try:
        return json.loads(data)
    except ValueError as error:
        raise InvalidRequestError(f"invalid {what}: not JSON ({error})") from error


def parse_manifest(data: bytes) -> dict[str, Any]:
    """A validated OCI image manifest whose config media type dmr understands."""
    manifest = _load_json(data, "manifest", MAX_MANIFEST_BYTES, "4 MiB")
    if not isinstance(manifest, dict) or manifest.get("schemaVersion") != 2:
        raise InvalidRequestError(
            "invalid manifest: expected an OCI image manifest (schemaVersion 2)"
        )
    config = _descriptor(manifest.get("config"), "config")
    if config.media_type not in media_types.KNOWN_CONFIG_MEDIA_TYPES:
        raise UnsupportedMediaTypeError(
            f"unsupported model config media type {config.media_type!r}; "
            f"dmr reads {', '.join(sorted(media_types.KNOWN_CONFIG_MEDIA_TYPES))}"
        )
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise InvalidRequestError("invalid manifest: layers is not a list")
    for number, layer in enumerate(layers):
        _descriptor(layer, f"layer {number}")
    return manifest


def config_descriptor(manifest: Mapping[str, Any]) -> Layer:
    return _descriptor(manifest.get("config"), "config")


def layers_of(manifest: Mapping[str, Any]) -> list[Layer]:
    return [_descriptor(layer, f"layer {n}") for n, layer in enumerate(manifest.get("layers", []))]


def modelpack_role(layer: Layer) -> str:
    """What a CNCF ModelPack raw layer holds, told by its file path (the spec's generic
    types say only weight, weight config or doc): a Docker media type it stands for,
    or "" for one the bundle does not need (docs, unknown weights)."""
    path = (layer.filepath or "").lower()
    name = path.rsplit("/", 1)[-1]
    if layer.media_type == media_types.CNCF_WEIGHT_RAW:
        if "mmproj" in name:
            return media_types.MMPROJ
        if name.endswith(".gguf"):
            return media_types.GGUF
        if name.endswith(".safetensors"):
            return media_types.SAFETENSORS
        if name.endswith(".dduf"):
            return media_types.DDUF
        return ""
    if layer.media_type == media_types.CNCF_WEIGHT_CONFIG_RAW and path:
        return media_types.CHAT_TEMPLATE if name.endswith(".jinja") else media_types.MODEL_FILE
    return ""


def format_for_layers(layers: list[Layer]) -> str:
    raw = {media_types.CNCF_WEIGHT_RAW, media_types.CNCF_WEIGHT_CONFIG_RAW}
    roles = {
        modelpack_role(layer) if layer.media_type in raw else layer.media_type for layer in layers
    }
    if roles & {media_types.GGUF, media_types.CNCF_GGUF}:
        return "gguf"
    # A diffusers pipeline's layers are safetensors too; its model_index.json tells.
    if any(layer.filepath == "model_index.json" for layer in layers):
        return "diffusers"
    if roles & {media_types.SAFETENSORS, media_types.CNCF_SAFETENSORS}:
        return "safetensors"
    if media_types.DDUF in roles:
        return "diffusers"
    return ""


def normalise_config(media_type: str, data: bytes, layers: list[Layer]) -> dict[str, Any]:
    """The config blob as Docker's shape (`{"config", "descriptor", "rootfs"}`)."""
    raw = _load_json(data, "model config", MAX_CONFIG_BYTES, "64 MiB")
    if not isinstance(raw, dict):
        raise InvalidRequestError("invalid model config: not a JSON object")
    if media_type == media_types.CONFIG_CNCF:
        return _from_modelpack(raw, layers)
    block = raw.get("config")
    if not isinstance(block, dict):
        block = {}
        raw["config"] = block
    if not block.get("format"):
        block["format"] = format_for_layers(layers)
    return raw


def _from_modelpack(raw: dict[str, Any], layers: list[Layer]) -> dict[str, Any]:
    source = raw.get("config") if isinstance(raw.get("config"), dict) else {}
    descriptor = raw.get("descriptor") if isinstance(raw.get("descriptor"), dict) else {}
    modelfs = raw.get("modelfs") if isinstance(raw.get("modelfs"), dict) else {}
    assert isinstance(source, dict) and isinstance(descriptor, dict) and isinstance(modelfs, dict)
    block: dict[str, Any] = {"format": str(source.get("format") or format_for_layers(layers))}
    for ours, theirs in (
        ("quantization", "quantization"),
        ("parameters", "paramSize"),
        ("architecture", "architecture"),
    ):
        if source.get(theirs):
            block[ours] = str(source[theirs])
    normalised: dict[str, Any] = {"config": block, "descriptor": {}}
    if descriptor.get("createdAt"):
        normalised["descriptor"]["created"] = descriptor["createdAt"]
    diff_ids = modelfs.get("diffIds") or [layer.digest for layer in layers]
    normalised["rootfs"] = {"type": "rootfs", "diff_ids": list(diff_ids)}
    return normalised


def safe_relative_path(text: str) -> PurePosixPath:
    """A relative path from an annotation or archive, refused if it could escape."""
    path = PurePosixPath(text)
    if (
        not text
        or "\\" in text
        or "\x00" in text
        or path.is_absolute()
        or any(part in {"", ".", ".."} for part in text.split("/"))
    ):
        raise InvalidRequestError(f"unsafe file path {text!r} in model artifact")
    return path
