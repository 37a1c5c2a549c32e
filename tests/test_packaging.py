"""Packaging: deterministic artifacts, GGUF/safetensors/DDUF, hostile GGUF headers."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
from dmr import media_types
from dmr.distribution.gguf import GGUFError, read_gguf
from dmr.distribution.packaging import (
    PackageOptions,
    package_dduf,
    package_gguf,
    package_safetensors_dir,
    repackage,
    write_to_store,
)
from dmr.errors import InvalidRequestError, UnsupportedMediaTypeError
from dmr.store import Store


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def tiny_gguf(
    path: Path, arch: str = "llama", *, tensor_count: int | None = None, kv_count: int | None = None
) -> Path:
    """A small valid GGUF v3: a few metadata keys, one long array, two tensors."""
    kvs = [
        _string("general.architecture") + struct.pack("<I", 8) + _string(arch),
        _string("general.file_type") + struct.pack("<I", 4) + struct.pack("<I", 15),
        _string(f"{arch}.context_length") + struct.pack("<I", 4) + struct.pack("<I", 2048),
        _string("tokenizer.ggml.tokens")
        + struct.pack("<IIQ", 9, 8, 60)
        + b"".join(_string(f"t{n}") for n in range(60)),
        _string("general.tags") + struct.pack("<IIQ", 9, 8, 2) + _string("a") + _string("b"),
    ]
    tensors = [
        _string("w1") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 8) + struct.pack("<IQ", 0, 0),
        _string("w2") + struct.pack("<I", 1) + struct.pack("<Q", 16) + struct.pack("<IQ", 0, 128),
    ]
    header = b"GGUF" + struct.pack(
        "<IQQ",
        3,
        len(tensors) if tensor_count is None else tensor_count,
        len(kvs) if kv_count is None else kv_count,
    )
    path.write_bytes(header + b"".join(kvs) + b"".join(tensors) + b"\0" * 256)
    return path


def test_gguf_metadata_in_config(tmp_path: Path) -> None:
    artifact = package_gguf(
        [tiny_gguf(tmp_path / "m.gguf")], PackageOptions(created="2025-01-01T00:00:00Z")
    )
    config = json.loads(artifact.config)
    block = config["config"]
    assert block["format"] == "gguf" and block["architecture"] == "llama"
    assert block["quantization"] == "Q4_K_M" and block["parameters"] == "48"
    assert block["gguf"]["llama.context_length"] == "2048"
    assert block["gguf"]["general.tags"] == "[a b]"
    assert "tokenizer.ggml.tokens" not in block["gguf"]  # arrays > 50 skipped
    assert config["descriptor"] == {"created": "2025-01-01T00:00:00Z"}
    assert config["rootfs"]["diff_ids"] == [artifact.layers[0].digest]
    manifest = json.loads(artifact.manifest)
    assert manifest["config"]["mediaType"] == media_types.CONFIG_V01
    assert manifest["layers"][0]["mediaType"] == media_types.GGUF


def test_same_files_and_created_give_the_same_digest(tmp_path: Path) -> None:
    gguf = tiny_gguf(tmp_path / "m.gguf")
    license_file = tmp_path / "LICENSE"
    license_file.write_text("Apache-2.0")
    options = PackageOptions(
        licenses=[license_file], context_size=4096, created="2025-01-01T00:00:00Z"
    )
    assert package_gguf([gguf], options).digest == package_gguf([gguf], options).digest
    later = PackageOptions(
        licenses=[license_file], context_size=4096, created="2025-01-02T00:00:00Z"
    )
    assert package_gguf([gguf], later).digest != package_gguf([gguf], options).digest


def test_sharded_gguf_is_found_from_the_first_shard(tmp_path: Path) -> None:
    shards = [tiny_gguf(tmp_path / f"big-{n:05d}-of-00003.gguf") for n in (1, 2, 3)]
    artifact = package_gguf([shards[0]])
    assert [layer.path for layer in artifact.layers] == shards
    store = Store.open(tmp_path / "models")
    model = write_to_store(store, artifact, ["big"])
    names = sorted(p.name for p in (model.bundle_dir / "model").iterdir())
    assert names == [f"model-{n:05d}-of-00003.gguf" for n in (1, 2, 3)]
    assert model.model_path().name == "model-00001-of-00003.gguf"  # the first (DMR: last)
    shards[2].unlink()
    with pytest.raises(InvalidRequestError, match="missing GGUF shards"):
        package_gguf([shards[0]])


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda data: data[:40], "truncated"),
        (lambda data: data[:-300], "truncated"),
        (lambda data: b"GGML" + data[4:], "bad magic"),
        (lambda data: data[:4] + struct.pack("<I", 1) + data[8:], "unsupported gguf version"),
        (lambda data: data[:8] + struct.pack("<Q", 2**62) + data[16:], "cannot fit"),
        (lambda data: data[:16] + struct.pack("<Q", 2**40) + data[24:], "cannot fit"),
        # The first key's length claims more than the file holds.
        (lambda data: data[:24] + struct.pack("<Q", 2**50) + data[32:], "truncated or corrupt"),
    ],
)
def test_hostile_gguf_headers_give_clear_errors(tmp_path: Path, mutate: object, words: str) -> None:
    good = tiny_gguf(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(mutate(good))  # type: ignore[operator]
    with pytest.raises(GGUFError) as caught:
        read_gguf(bad)
    assert words in str(caught.value).lower()
    with pytest.raises(InvalidRequestError, match="invalid GGUF"):
        package_gguf([bad])


def test_lying_array_length_is_refused_before_allocating(tmp_path: Path) -> None:
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    kv = _string("x") + struct.pack("<IIQ", 9, 4, 2**61)  # 2^61 uint32 items
    path = tmp_path / "lie.gguf"
    path.write_bytes(header + kv + b"\0" * 64)
    with pytest.raises(GGUFError, match="cannot fit"):
        read_gguf(path)


def test_safetensors_directory_is_one_layer_per_file(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (model / "sub" / "tokenizer.json").write_text("{}")
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("x")
    artifact = package_safetensors_dir(model, PackageOptions(created="2025-01-01T00:00:00Z"))
    manifest = json.loads(artifact.manifest)
    assert manifest["config"]["mediaType"] == media_types.CONFIG_V02
    paths = {
        layer["annotations"][media_types.FILEPATH_ANNOTATION]: layer["mediaType"]
        for layer in manifest["layers"]
    }
    assert paths == {
        "config.json": media_types.MODEL_FILE,
        "model.safetensors": media_types.SAFETENSORS,
        "sub/tokenizer.json": media_types.MODEL_FILE,
    }
    block = json.loads(artifact.config)["config"]
    assert block["format"] == "safetensors" and block["parameters"] == "6"
    assert block["quantization"] == "BF16" and block["architecture"] == "LlamaForCausalLM"
    store = Store.open(tmp_path / "models")
    stored = write_to_store(store, artifact, ["org/st:v1"])
    assert (stored.bundle_dir / "model" / "sub" / "tokenizer.json").read_text() == "{}"
    assert stored.model_path() == stored.bundle_dir / "model"


def test_dduf_and_repackage(tmp_path: Path) -> None:
    dduf = tmp_path / "pipe.dduf"
    with zipfile.ZipFile(dduf, "w") as archive:
        archive.writestr("unet/config.json", "{}")
        archive.writestr("model_index.json", "{}")
    artifact = package_dduf(dduf)
    assert json.loads(artifact.config)["config"]["format"] == "diffusers"
    store = Store.open(tmp_path / "models")
    model = write_to_store(store, artifact, ["org/pipe:v1"])
    assert model.model_path().name == "model.dduf"
    variant = repackage(store, model, PackageOptions(context_size=77))
    again = write_to_store(store, variant, ["org/pipe:ctx"])
    assert again.model_config["context_size"] == 77 and again.files == model.files
    (tmp_path / "junk.dduf").write_text("not a zip")
    with pytest.raises(InvalidRequestError, match="not a DDUF"):
        package_dduf(tmp_path / "junk.dduf")


def test_cncf_modelpack_config_is_read(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "models")
    weights, size = store.import_file(tiny_gguf(tmp_path / "m.gguf"))
    config = json.dumps(
        {
            "descriptor": {"createdAt": "2025-03-04T05:06:07.123456789Z", "name": "m"},
            "config": {"architecture": "llama", "format": "gguf", "paramSize": "48"},
            "modelfs": {"type": "layers", "diffIds": [weights]},
        }
    ).encode()
    config_digest = store.put_blob_bytes(config)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": media_types.CONFIG_CNCF,
            "digest": config_digest,
            "size": len(config),
        },
        "layers": [{"mediaType": media_types.CNCF_GGUF, "digest": weights, "size": size}],
    }
    model = store.add_model(json.dumps(manifest).encode(), ["org/pack:v1"])
    assert model.format == "gguf" and model.model_config["parameters"] == "48"
    assert model.created == 1741064767 and model.model_path().name == "model.gguf"
    manifest["config"]["mediaType"] = "application/vnd.example.other+json"
    with pytest.raises(UnsupportedMediaTypeError):
        store.add_model(json.dumps(manifest).encode(), ["org/other:v1"])
