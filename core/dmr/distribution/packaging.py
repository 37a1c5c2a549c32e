"""Deterministic OCI model artifacts from local files (`dmr package`, docs/compatibility.md §2).

The artifact is described by bytes alone (manifest + config) plus the files its
layers come from, so the same files and the same `created` time always give the
same manifest digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmr import media_types
from dmr.distribution.gguf import (
    GGUFError,
    merge_shards,
    metadata_strings,
    quantization_name,
    read_gguf,
)
from dmr.errors import InvalidRequestError, StoreError
from dmr.sizes import human_parameters, human_size
from dmr.store.artifact import OCI_MANIFEST, layers_of
from dmr.store.blobs import hash_file

if TYPE_CHECKING:
    from dmr.store import Store, StoredModel

__all__ = [
    "Artifact",
    "LayerFile",
    "PackageOptions",
    "find_gguf_shards",
    "human_parameters",
    "human_size",
    "package_dduf",
    "package_gguf",
    "package_safetensors_dir",
    "repackage",
    "rfc3339",
    "to_modelpack",
    "write_to_store",
]

_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# Marks a diffusers pipeline directory (packaged with --safetensors-dir).
DIFFUSERS_INDEX = "model_index.json"


@dataclass(frozen=True)
class LayerFile:
    """A layer and the local file holding its bytes."""

    path: Path
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_path(
        cls,
        path: Path,
        media_type: str,
        annotations: Mapping[str, str] | None = None,
        *,
        verified: Mapping[Path, str] | None = None,
    ) -> LayerFile:
        """The layer for `path`, hashed here unless `verified` already knows its digest."""
        known = (verified or {}).get(Path(path).absolute())
        if known is not None:
            return cls(path, media_type, known, path.stat().st_size, dict(annotations or {}))
        digest, size = hash_file(path)
        return cls(path, media_type, digest, size, dict(annotations or {}))

    def descriptor(self) -> dict[str, Any]:
        descriptor: dict[str, Any] = {
            "mediaType": self.media_type,
            "size": self.size,
            "digest": self.digest,
        }
        if self.annotations:
            descriptor["annotations"] = dict(sorted(self.annotations.items()))
        return descriptor


@dataclass(frozen=True)
class Artifact:
    manifest: bytes
    config: bytes
    layers: tuple[LayerFile, ...]

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def config_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.config).hexdigest()


@dataclass(frozen=True)
class PackageOptions:
    licenses: Sequence[Path] = ()
    chat_template: Path | None = None
    mmproj: Path | None = None
    context_size: int | None = None
    # RFC 3339 or a datetime; None: $SOURCE_DATE_EPOCH, else now.
    created: datetime | str | None = None
    # Digests of files (absolute paths) verified as they were written, such as the
    # blobs a pull just stored: taken as they are instead of reading the files again.
    verified_digests: Mapping[Path, str] = field(default_factory=dict)


def rfc3339(created: datetime | str | None) -> str:
    if isinstance(created, str):
        return created
    if created is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        created = (datetime.fromtimestamp(int(epoch), UTC) if epoch else datetime.now(UTC)).replace(
            microsecond=0
        )
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _require_file(path: Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidRequestError(f"{what} {str(path)!r} is not a readable file")
    return path


def _extras(options: PackageOptions) -> list[LayerFile]:
    verified = options.verified_digests
    layers = [
        LayerFile.from_path(_require_file(path, "license"), media_types.LICENSE, verified=verified)
        for path in options.licenses
    ]
    if options.mmproj is not None:
        mmproj = _require_file(options.mmproj, "mmproj")
        layers.append(LayerFile.from_path(mmproj, media_types.MMPROJ, verified=verified))
    if options.chat_template is not None:
        template = _require_file(options.chat_template, "chat template")
        layers.append(LayerFile.from_path(template, media_types.CHAT_TEMPLATE, verified=verified))
    return layers


def _dump(value: Any) -> bytes:
    # Compact and in a fixed key order: the bytes ARE the digest.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _build(
    config_media_type: str,
    block: dict[str, Any],
    layers: Sequence[LayerFile],
    options: PackageOptions,
) -> Artifact:
    if options.context_size is not None:
        if options.context_size <= 0 or options.context_size > 2**31 - 1:
            raise InvalidRequestError(f"invalid context size {options.context_size}")
        block["context_size"] = options.context_size
    config = {
        "config": block,
        "descriptor": {"created": rfc3339(options.created)},
        "rootfs": {"type": "rootfs", "diff_ids": [layer.digest for layer in layers]},
    }
    config_bytes = _dump(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": config_media_type,
            "size": len(config_bytes),
            "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
        },
        "layers": [layer.descriptor() for layer in layers],
    }
    return Artifact(manifest=_dump(manifest), config=config_bytes, layers=tuple(layers))


# ------------------------------------------------------------------------- GGUF


def find_gguf_shards(paths: Sequence[Path]) -> list[Path]:
    """The shards of a model: given the first shard alone, its siblings are found
    (`model-00001-of-00003.gguf`); given several files, they are put in order."""
    if not paths:
        raise InvalidRequestError("no GGUF file given")
    files = [_require_file(path, "GGUF file") for path in paths]
    if len(files) == 1:
        match = _SHARD.match(files[0].name)
        if match is None:
            return files
        count = int(match["count"])
        files = [
            files[0].with_name(f"{match['stem']}-{n:05d}-of-{count:05d}.gguf")
            for n in range(1, count + 1)
        ]
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise InvalidRequestError(f"missing GGUF shards: {', '.join(missing)}")
        return files
    matches = [_SHARD.match(path.name) for path in files]
    if all(matches):
        return [
            path
            for _, path in sorted(zip([int(m["index"]) for m in matches if m], files, strict=True))
        ]
    return files


def package_gguf(paths: Sequence[Path], options: PackageOptions | None = None) -> Artifact:
    options = options or PackageOptions()
    shards = find_gguf_shards(paths)
    try:
        gguf = merge_shards([read_gguf(path) for path in shards])
    except GGUFError as error:
        raise InvalidRequestError(f"invalid GGUF file: {error}") from error
    block: dict[str, Any] = {
        "format": "gguf",
        "quantization": quantization_name(gguf),
        "parameters": human_parameters(gguf.parameters),
        "architecture": gguf.architecture,
        "size": human_size(gguf.size),
        "gguf": metadata_strings(gguf),
    }
    weights = [
        LayerFile.from_path(path, media_types.GGUF, verified=options.verified_digests)
        for path in shards
    ]
    return _build(media_types.CONFIG_V01, block, [*weights, *_extras(options)], options)


# ------------------------------------------------------------------------- safetensors


def _safetensors_header(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise InvalidRequestError(f"{path.name}: truncated safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_SAFETENSORS_HEADER or length > size - 8:
            raise InvalidRequestError(f"{path.name}: corrupt safetensors header length {length}")
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise InvalidRequestError(f"{path.name}: corrupt safetensors header") from error
    if not isinstance(header, dict):
        raise InvalidRequestError(f"{path.name}: corrupt safetensors header")
    return header


def _safetensors_block(root: Path, weights: list[Path], total_size: int) -> dict[str, Any]:
    parameters = 0
    dtypes: dict[str, int] = {}
    metadata: dict[str, str] = {}
    for path in weights:
        for name, info in _safetensors_header(path).items():
            if name == "__metadata__" and isinstance(info, dict):
                metadata.update({str(k): str(v) for k, v in info.items()})
                continue
            if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
                continue
            count = 1
            for dim in info["shape"]:
                count *= int(dim) if isinstance(dim, int) else 0
            parameters += count
            dtype = str(info.get("dtype", ""))
            dtypes[dtype] = dtypes.get(dtype, 0) + count
    architecture = ""
    config_path = root / "config.json"
    if config_path.is_file():
        try:
            model_config = json.loads(config_path.read_text())
            archs = model_config.get("architectures") if isinstance(model_config, dict) else None
            if isinstance(archs, list) and archs:
                architecture = str(archs[0])
            elif isinstance(model_config, dict):
                architecture = str(model_config.get("model_type") or "")
        except (OSError, ValueError):
            pass
    block: dict[str, Any] = {
        "format": "safetensors",
        "quantization": max(dtypes, key=lambda d: dtypes[d]) if dtypes else "",
        "parameters": human_parameters(parameters),
        "architecture": architecture,
        "size": human_size(total_size),
    }
    if metadata:
        block["safetensors"] = dict(sorted(metadata.items()))
    return {k: v for k, v in block.items() if v != ""}


def package_safetensors_dir(directory: Path, options: PackageOptions | None = None) -> Artifact:
    """One layer per file, each annotated with its relative path (config v0.2).

    A directory with a `model_index.json` is a diffusers pipeline: format "diffusers".
    """
    options = options or PackageOptions()
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise InvalidRequestError(f"safetensors directory {str(root)!r} is not a directory")
    files: list[tuple[str, Path]] = []
    for path in root.rglob("*"):
        relative = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in relative.split("/")):
            continue  # .git, .cache: not part of the model
        if path.is_symlink():
            raise InvalidRequestError(f"refusing symlink {relative!r} in the model directory")
        if path.is_file():
            files.append((relative, path))
    files.sort()
    weights = [path for relative, path in files if relative.endswith(".safetensors")]
    if not weights:
        raise InvalidRequestError(f"no .safetensors files in {str(root)!r}")
    layers = [
        LayerFile.from_path(
            path,
            media_types.SAFETENSORS
            if relative.endswith(".safetensors")
            else media_types.MODEL_FILE,
            {media_types.FILEPATH_ANNOTATION: relative},
            verified=options.verified_digests,
        )
        for relative, path in files
    ]
    block = _safetensors_block(root, weights, sum(layer.size for layer in layers))
    if (root / DIFFUSERS_INDEX).is_file():
        block = _diffusers_block(root, block)
    return _build(media_types.CONFIG_V02, block, [*layers, *_extras(options)], options)


def _diffusers_block(root: Path, block: dict[str, Any]) -> dict[str, Any]:
    """A diffusers directory (model_index.json + component folders) is an image
    pipeline for the diffusers engine, not a language model for vLLM."""
    try:
        index = json.loads((root / DIFFUSERS_INDEX).read_text())
    except (OSError, ValueError) as error:
        raise InvalidRequestError(f"{DIFFUSERS_INDEX}: not valid JSON ({error})") from error
    if not isinstance(index, dict):
        raise InvalidRequestError(f"{DIFFUSERS_INDEX}: not a JSON object")
    components = sorted(
        name
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value[:1] != [None]
        and (root / name).is_dir()
    )
    diffusers_block = {"components": ",".join(components)} if components else {}
    block = {**block, "format": "diffusers", "architecture": str(index.get("_class_name") or "")}
    block.pop("safetensors", None)
    if diffusers_block:
        block["diffusers"] = diffusers_block
    return {k: v for k, v in block.items() if v != ""}


# ------------------------------------------------------------------------- DDUF


def package_dduf(path: Path, options: PackageOptions | None = None) -> Artifact:
    options = options or PackageOptions()
    path = _require_file(path, "DDUF file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise InvalidRequestError(f"{path.name}: not a DDUF archive ({error})") from error
    components = sorted({name.split("/", 1)[0] for name in names if "/" in name})
    layer = LayerFile.from_path(path, media_types.DDUF, verified=options.verified_digests)
    block: dict[str, Any] = {
        "format": "diffusers",
        "size": human_size(layer.size),
        "diffusers": {"components": ",".join(components)} if components else {},
    }
    if not block["diffusers"]:
        del block["diffusers"]
    return _build(media_types.CONFIG_V01, block, [layer, *_extras(options)], options)


# ------------------------------------------------------------------------- repackaging


def repackage(store: Store, model: StoredModel, options: PackageOptions | None = None) -> Artifact:
    """A variant of a stored model: same layers (plus any extras), new context size."""
    options = options or PackageOptions()
    layers = [
        LayerFile(
            path=store.blob_path(layer.digest),
            media_type=layer.media_type,
            digest=layer.digest,
            size=layer.size,
            annotations=dict(layer.annotations),
        )
        for layer in layers_of(model.manifest)
    ]
    block = dict(model.model_config)
    if options.created is None:
        descriptor = model.config.get("descriptor")
        created = descriptor.get("created") if isinstance(descriptor, Mapping) else None
        options = PackageOptions(
            licenses=options.licenses,
            chat_template=options.chat_template,
            mmproj=options.mmproj,
            context_size=options.context_size,
            created=created if isinstance(created, str) else None,
        )
    annotated = any(layer.annotations for layer in layers)
    config_type = media_types.CONFIG_V02 if annotated else media_types.CONFIG_V01
    return _build(config_type, block, [*layers, *_extras(options)], options)


# ------------------------------------------------------------------------- CNCF ModelPack


# Docker's layer media types and the ModelPack kind each becomes, as Docker Model
# Runner's modelpack.MapLayerMediaType classifies them.
_MODELPACK_KINDS: dict[str, str] = {
    media_types.GGUF: media_types.CNCF_WEIGHT_RAW,
    media_types.SAFETENSORS: media_types.CNCF_WEIGHT_RAW,
    media_types.DDUF: media_types.CNCF_WEIGHT_RAW,
    media_types.MMPROJ: media_types.CNCF_WEIGHT_RAW,
    media_types.CHAT_TEMPLATE: media_types.CNCF_WEIGHT_CONFIG_RAW,
    media_types.MODEL_FILE: media_types.CNCF_WEIGHT_CONFIG_RAW,
    media_types.LICENSE: media_types.CNCF_DOC_RAW,
}


def _modelpack_path(layer: LayerFile) -> str:
    """The layer's `org.cncf.model.filepath`: what tells a reader what a raw layer holds
    (dmr's reader: a `.gguf`, `.safetensors` or `.dduf` weight, `mmproj` in the name
    for a projector, a `.jinja` chat template)."""
    given = layer.annotations.get(media_types.FILEPATH_ANNOTATION)
    if given:
        return given
    name = layer.path.name
    if layer.media_type == media_types.MMPROJ and "mmproj" not in name.lower():
        return f"mmproj-{name}"
    if layer.media_type == media_types.CHAT_TEMPLATE and not name.endswith(".jinja"):
        return "template.jinja"
    if layer.media_type == media_types.DDUF and not name.endswith(".dduf"):
        return f"{name}.dduf"
    return name


def to_modelpack(artifact: Artifact) -> Artifact:
    """The artifact in CNCF ModelPack format (`dmr package --format cncf`), as Docker
    Model Runner's builder writes it: the manifest's `artifactType`, a ModelPack config
    (`descriptor.createdAt`/`family`, `modelfs.diffIds`, `config.architecture`/
    `format`/`paramSize`/`quantization`) and the layers as raw weight, weight-config
    and doc layers, each with its file path. Same files, so the same blobs."""
    source = json.loads(artifact.config)
    block = source.get("config") or {}
    if block.get("context_size") is not None:
        raise InvalidRequestError(
            "a CNCF ModelPack config has no context size; package with --format docker"
            " to set one, or give the context size with `dmr configure`"
        )
    layers: list[LayerFile] = []
    for layer in artifact.layers:
        kind = _MODELPACK_KINDS.get(layer.media_type)
        if kind is None:
            raise InvalidRequestError(f"no CNCF ModelPack layer type for {layer.media_type}")
        annotations = {**layer.annotations, media_types.FILEPATH_ANNOTATION: _modelpack_path(layer)}
        layers.append(
            LayerFile(layer.path, kind, layer.digest, layer.size, dict(sorted(annotations.items())))
        )
    architecture = str(block.get("architecture") or "")
    descriptor: dict[str, Any] = {"createdAt": source.get("descriptor", {}).get("created")}
    if architecture:
        descriptor["family"] = architecture
    model_config = {
        key: str(block[ours])
        for key, ours in (
            ("architecture", "architecture"),
            ("format", "format"),
            ("paramSize", "parameters"),
            ("quantization", "quantization"),
        )
        if block.get(ours)
    }
    modelpack = {
        "descriptor": descriptor,
        "modelfs": {"type": "layers", "diffIds": [layer.digest for layer in layers]},
        "config": model_config,
    }
    config_bytes = _dump(modelpack)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": media_types.CNCF_MANIFEST_ARTIFACT_TYPE,
        "config": {
            "mediaType": media_types.CONFIG_CNCF,
            "size": len(config_bytes),
            "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
        },
        "layers": [layer.descriptor() for layer in layers],
    }
    return Artifact(manifest=_dump(manifest), config=config_bytes, layers=tuple(layers))


# ------------------------------------------------------------------------- store


def write_to_store(store: Store, artifact: Artifact, tags: Iterable[str] = ()) -> StoredModel:
    """Copy the artifact's files into the store and record it under `tags`."""
    for layer in artifact.layers:
        if store.has_blob(layer.digest):
            continue
        digest, _size = store.import_file(layer.path)
        if digest != layer.digest:
            raise StoreError(
                f"{layer.path} changed while it was being packaged ({layer.digest} → {digest})"
            )
    store.put_blob_bytes(artifact.config)
    return store.add_model(artifact.manifest, tags)
