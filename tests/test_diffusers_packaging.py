"""Packaging a diffusers directory: format "diffusers", files kept at their relative
paths, and the scheduler picks the diffusers engine for it (never vLLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dmr import media_types, plugins
from dmr.distribution.packaging import (
    PackageOptions,
    package_dduf,
    package_safetensors_dir,
    write_to_store,
)
from dmr.hardware.cpu import probe_cpu
from dmr.records import Mode
from dmr.scheduler import Scheduler
from dmr.settings import Settings
from dmr.store import Store
from dmr.store.artifact import format_for_layers, layers_of, normalise_config

pytestmark = pytest.mark.diffusers

CREATED = "2025-01-01T00:00:00Z"


def _scheduler(store: Store) -> Scheduler:
    engines = {spec.name: spec for spec in plugins.engines()}
    return Scheduler(
        settings=Settings.from_env(),
        store=store,
        engines=engines,
        devices=[probe_cpu()],
        formats=plugins.model_formats(),
    )


def test_diffusers_directory_packages_as_format_diffusers(
    tiny_diffusers_dir: Path, tmp_path: Path
) -> None:
    artifact = package_safetensors_dir(tiny_diffusers_dir, PackageOptions(created=CREATED))
    block = json.loads(artifact.config)["config"]
    assert block["format"] == "diffusers"
    assert block["architecture"] == "StableDiffusionPipeline"
    assert block["diffusers"] == {"components": "scheduler,text_encoder,tokenizer,unet,vae"}
    assert "safetensors" not in block
    manifest = json.loads(artifact.manifest)
    paths = {
        layer["annotations"][media_types.FILEPATH_ANNOTATION]: layer["mediaType"]
        for layer in manifest["layers"]
    }
    assert paths["model_index.json"] == media_types.MODEL_FILE
    assert paths["unet/diffusion_pytorch_model.safetensors"] == media_types.SAFETENSORS
    assert paths["tokenizer/tokenizer.json"] == media_types.MODEL_FILE
    # Deterministic, as every packaging is.
    again = package_safetensors_dir(tiny_diffusers_dir, PackageOptions(created=CREATED))
    assert again.digest == artifact.digest

    store = Store.open(tmp_path / "models")
    stored = write_to_store(store, artifact, ["org/tiny-sd:v1"])
    model_dir = stored.bundle_dir / "model"
    for relative in paths:
        assert (model_dir / relative).read_bytes() == (tiny_diffusers_dir / relative).read_bytes()
    assert stored.format == "diffusers"
    assert _scheduler(store).engine_for(stored, Mode.IMAGE_GENERATION, None).name == "diffusers"


def test_layers_alone_say_diffusers(tiny_diffusers_dir: Path) -> None:
    """A config without `format` (another tool's artifact) is still routed right."""
    artifact = package_safetensors_dir(tiny_diffusers_dir)
    layers = layers_of(json.loads(artifact.manifest))
    assert format_for_layers(layers) == "diffusers"
    config = normalise_config(media_types.CONFIG_V02, json.dumps({"config": {}}).encode(), layers)
    assert config["config"]["format"] == "diffusers"


def test_dduf_packages_for_the_diffusers_engine(tiny_diffusers_dduf: Path, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "models")
    stored = write_to_store(store, package_dduf(tiny_diffusers_dduf), ["org/tiny-sd:dduf"])
    assert stored.model_path() == stored.bundle_dir / "model" / "model.dduf"
    assert _scheduler(store).engine_for(stored, Mode.IMAGE_GENERATION, None).name == "diffusers"


def test_plain_safetensors_directory_is_unchanged(tmp_path: Path) -> None:
    """Without model_index.json a directory stays a safetensors (vLLM) model."""
    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (folder / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 4
    )
    block = json.loads(package_safetensors_dir(folder).config)["config"]
    assert block["format"] == "safetensors"
