"""Bundles: `bundles/sha256/<hex>/` = `config.json` + `model/` with the files an
engine loads, hard-linked from the blobs under the names DMR uses."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmr import media_types
from dmr.errors import StoreError
from dmr.store.artifact import Layer, layers_of, modelpack_role, safe_relative_path
from dmr.store.blobs import link_or_copy

if TYPE_CHECKING:
    from dmr.store.layout import StoreLayout

__all__ = ["bundle_file_names", "write_bundle"]

_GGUF_TYPES = {media_types.GGUF, media_types.CNCF_GGUF}
_SAFETENSORS_TYPES = {media_types.SAFETENSORS, media_types.CNCF_SAFETENSORS}
_LEGACY_TARS = {media_types.LEGACY_DIR_TAR, media_types.LEGACY_VLLM_CONFIG_TAR}
_MODELPACK_RAW = {
    media_types.CNCF_WEIGHT_RAW,
    media_types.CNCF_WEIGHT_CONFIG_RAW,
    media_types.CNCF_DOC_RAW,
}


def _numbered(stem: str, suffix: str, count: int) -> list[str]:
    if count == 1:
        return [f"{stem}{suffix}"]
    return [f"{stem}-{n:05d}-of-{count:05d}{suffix}" for n in range(1, count + 1)]


def _role(layer: Layer) -> str:
    return modelpack_role(layer) if layer.media_type in _MODELPACK_RAW else layer.media_type


def bundle_file_names(layers: list[Layer]) -> list[tuple[Layer, str]]:
    """(layer, path under model/) for every layer that goes into the bundle."""
    placed: list[tuple[Layer, str]] = []
    ggufs = [layer for layer in layers if _role(layer) in _GGUF_TYPES]
    placed += zip(ggufs, _numbered("model", ".gguf", len(ggufs)), strict=True)
    safetensors = [layer for layer in layers if _role(layer) in _SAFETENSORS_TYPES]
    if safetensors and all(layer.filepath for layer in safetensors):
        placed += [(layer, str(safe_relative_path(layer.filepath or ""))) for layer in safetensors]
    else:
        placed += zip(
            safetensors, _numbered("model", ".safetensors", len(safetensors)), strict=True
        )
    for layer in layers:
        role = _role(layer)
        if role == media_types.MMPROJ:
            placed.append((layer, "model.mmproj"))
        elif role == media_types.CHAT_TEMPLATE:
            placed.append((layer, "template.jinja"))
        elif role == media_types.DDUF:
            placed.append((layer, "model.dduf"))
        elif role == media_types.MODEL_FILE and layer.filepath:
            placed.append((layer, str(safe_relative_path(layer.filepath))))
    seen: set[str] = set()
    for _, name in placed:
        if name in seen:
            raise StoreError(f"model artifact has two files at {name!r}")
        seen.add(name)
    return placed


def _extract_legacy_tar(blob: Path, model_dir: Path) -> None:
    # DMR's old vllm.config.tar / dir.tar layers: plain files and directories only.
    with tarfile.open(blob) as archive:
        for member in archive.getmembers():
            safe_relative_path(member.name.rstrip("/"))
            if not (member.isfile() or member.isdir()):
                raise StoreError(f"refusing {member.name!r} in a legacy tar layer: not a file")
        archive.extractall(model_dir, filter="data")


def write_bundle(
    layout: StoreLayout, model_id: str, manifest: Mapping[str, Any], config: Mapping[str, Any]
) -> Path:
    """Build the bundle in a temp dir and rename it into place (idempotent)."""
    target = layout.bundle(model_id)
    if (target / "config.json").exists():
        return target
    layout.tmp_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=layout.tmp_dir, prefix="bundle-"))
    try:
        model_dir = staging / "model"
        model_dir.mkdir()
        layers = layers_of(manifest)
        for layer, name in bundle_file_names(layers):
            link_or_copy(layout.blob(layer.digest), model_dir / name)
        for layer in layers:
            if layer.media_type in _LEGACY_TARS:
                _extract_legacy_tar(layout.blob(layer.digest), model_dir)
        block = config.get("config") if isinstance(config.get("config"), Mapping) else {}
        (staging / "config.json").write_text(json.dumps(block, indent=2))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)  # a half-built bundle from a crash
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
