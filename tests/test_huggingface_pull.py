"""Hugging Face pulls against a local fake of the Hub (real huggingface_hub, real store)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from dmr import media_types
from dmr.distribution.service import pull_model, source_for
from dmr.errors import ModelNotFoundError
from dmr.records import ProgressEvent
from dmr.store import Store, StoredModel

from tests.fixtures.file_reads import reads_under
from tests.fixtures.hf_hub import FakeHub, tiny_gguf

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


@pytest.fixture(autouse=True)
def _hub_endpoint(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def layer_types(model: StoredModel) -> list[str]:
    return [layer["mediaType"] for layer in model.manifest["layers"]]


def layer_bytes(store: Store, model: StoredModel, media_type: str) -> list[bytes]:
    return [
        store.blob_path(layer["digest"]).read_bytes()
        for layer in model.manifest["layers"]
        if layer["mediaType"] == media_type
    ]


def gguf_repo(hub: FakeHub) -> dict[str, bytes]:
    files = {
        "README.md": b"# tiny\n",
        "tiny-Q8_0.gguf": tiny_gguf("q8", 6000),
        "tiny-Q4_K_M.gguf": tiny_gguf("q4km", 5000),
        "tiny-Q4_K.gguf": tiny_gguf("q4k", 5000),
        "mmproj-tiny-f16.gguf": tiny_gguf("mmproj", 3000, architecture="clip"),
        "template.jinja": TEMPLATE.encode(),
        "Q2_K/tiny-Q2_K-00001-of-00002.gguf": tiny_gguf("q2k-1", 4000),
        "Q2_K/tiny-Q2_K-00002-of-00002.gguf": tiny_gguf("q2k-2", 4000),
    }
    hub.add_repo("TestOrg/Tiny-GGUF", files)
    return files


def test_hf_references_use_the_hugging_face_source() -> None:
    assert source_for("hf.co/org/repo:Q4_K_M").name == "huggingface"
    assert source_for("huggingface.co/org/repo").name == "huggingface"
    assert source_for("ai/smollm2").name == "oci"


async def test_default_quant_mmproj_and_template(fake_hub: FakeHub, tmp_path: Path) -> None:
    files = gguf_repo(fake_hub)
    store = Store.open(tmp_path / "store")
    events: list[ProgressEvent] = []
    model = await pull_model(store, "hf.co/TestOrg/Tiny-GGUF", events.append)
    assert model.tags == ("huggingface.co/testorg/tiny-gguf:latest",)
    assert layer_bytes(store, model, media_types.GGUF) == [files["tiny-Q4_K_M.gguf"]]
    assert layer_bytes(store, model, media_types.MMPROJ) == [files["mmproj-tiny-f16.gguf"]]
    assert layer_bytes(store, model, media_types.CHAT_TEMPLATE) == [TEMPLATE.encode()]
    assert "tiny-Q8_0.gguf" not in fake_hub.downloads()
    assert any(e.type == "progress" and e.layer_id for e in events)
    # Deterministic: the same repository pulled again gives the same ID.
    again = await pull_model(
        Store.open(tmp_path / "again"), "hf.co/testorg/tiny-gguf", lambda e: None
    )
    assert again.id == model.id


async def test_quant_tag_is_matched_case_insensitively(fake_hub: FakeHub, tmp_path: Path) -> None:
    files = gguf_repo(fake_hub)
    store = Store.open(tmp_path / "store")
    model = await pull_model(store, "hf.co/TestOrg/Tiny-GGUF:q8_0", lambda e: None)
    assert model.tags == ("huggingface.co/testorg/tiny-gguf:q8_0",)
    assert layer_bytes(store, model, media_types.GGUF) == [files["tiny-Q8_0.gguf"]]
    # Q4_K must not take Q4_K_M.
    model = await pull_model(store, "hf.co/TestOrg/Tiny-GGUF:Q4_K", lambda e: None)
    assert layer_bytes(store, model, media_types.GGUF) == [files["tiny-Q4_K.gguf"]]


async def test_shards_are_kept_together_in_order(fake_hub: FakeHub, tmp_path: Path) -> None:
    files = gguf_repo(fake_hub)
    store = Store.open(tmp_path / "store")
    model = await pull_model(store, "hf.co/TestOrg/Tiny-GGUF:Q2_K", lambda e: None)
    assert layer_bytes(store, model, media_types.GGUF) == [
        files["Q2_K/tiny-Q2_K-00001-of-00002.gguf"],
        files["Q2_K/tiny-Q2_K-00002-of-00002.gguf"],
    ]
    first = model.model_path()
    assert first.name == "model-00001-of-00002.gguf"
    assert first.read_bytes() == files["Q2_K/tiny-Q2_K-00001-of-00002.gguf"]


async def test_first_gguf_without_the_default_quant_and_template_from_tokenizer_config(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    files = {
        "b-F16.gguf": tiny_gguf("f16", 3000),
        "a-Q8_0.gguf": tiny_gguf("a-q8", 3000),
        "tokenizer_config.json": json.dumps({"chat_template": TEMPLATE}).encode(),
    }
    fake_hub.add_repo("org/no-default", files)
    store = Store.open(tmp_path / "store")
    model = await pull_model(store, "hf.co/org/no-default", lambda e: None)
    assert layer_bytes(store, model, media_types.GGUF) == [files["a-Q8_0.gguf"]]
    assert layer_bytes(store, model, media_types.CHAT_TEMPLATE) == [TEMPLATE.encode()]


async def test_missing_quant_is_a_clear_error(fake_hub: FakeHub, tmp_path: Path) -> None:
    gguf_repo(fake_hub)
    store = Store.open(tmp_path / "store")
    with pytest.raises(ModelNotFoundError, match="Q3_K_S"):
        await pull_model(store, "hf.co/TestOrg/Tiny-GGUF:Q3_K_S", lambda e: None)
    with pytest.raises(ModelNotFoundError):
        await pull_model(store, "hf.co/TestOrg/does-not-exist", lambda e: None)
    assert store.list_models() == []


async def test_safetensors_repository(fake_hub: FakeHub, tmp_path: Path) -> None:
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    weights = len(header).to_bytes(8, "little") + header
    files = {
        "model.safetensors": weights,
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"]}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": json.dumps({"chat_template": TEMPLATE}).encode(),
        "README.md": b"not part of the model",
        "images/logo.png": b"\x89PNG",
    }
    fake_hub.add_repo("org/tiny-safetensors", files)
    store = Store.open(tmp_path / "store")
    model = await pull_model(store, "hf.co/org/tiny-safetensors", lambda e: None)
    assert model.manifest["config"]["mediaType"] == media_types.CONFIG_V02
    paths = {
        layer["annotations"][media_types.FILEPATH_ANNOTATION]: layer["mediaType"]
        for layer in model.manifest["layers"]
    }
    assert paths == {
        "model.safetensors": media_types.SAFETENSORS,
        "config.json": media_types.MODEL_FILE,
        "tokenizer.json": media_types.MODEL_FILE,
        "tokenizer_config.json": media_types.MODEL_FILE,
    }
    assert model.format == "safetensors"


async def test_pull_reads_no_downloaded_file_back(fake_hub: FakeHub, tmp_path: Path) -> None:
    # Each file is hashed as it is written; packaging it into a model then takes that
    # digest instead of reading the weights a second time.
    weights = tiny_gguf("big", 5_000_000)
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [3_000_000], "data_offsets": [0, 3_000_000]}}
    )
    tensors = len(header).to_bytes(8, "little") + header.encode() + b"\x07" * 3_000_000
    fake_hub.add_repo("org/read-once-gguf", {"big-Q4_K_M.gguf": weights})
    fake_hub.add_repo(
        "org/read-once-st",
        {"model.safetensors": tensors, "config.json": b'{"architectures": ["LlamaForCausalLM"]}'},
    )
    store = Store.open(tmp_path / "store")
    with reads_under(store.root) as reads:
        gguf = await pull_model(store, "hf.co/org/read-once-gguf", lambda e: None)
        safetensors = await pull_model(store, "hf.co/org/read-once-st", lambda e: None)
    assert layer_bytes(store, gguf, media_types.GGUF) == [weights]
    assert layer_bytes(store, safetensors, media_types.SAFETENSORS) == [tensors]
    # Headers only (GGUF metadata, the safetensors JSON): never the megabytes again.
    assert sum(reads.values()) < 64 * 1024, reads


async def test_interrupted_hub_download_resumes_with_range(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    files = gguf_repo(fake_hub)
    store = Store.open(tmp_path / "store")
    data = files["tiny-Q4_K_M.gguf"]
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    partial = store.layout.incomplete_blob(digest)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(data[:2000])
    await pull_model(store, "hf.co/TestOrg/Tiny-GGUF", lambda e: None)
    ranges = [
        r.range for r in fake_hub.requests if r.method == "GET" and r.path.endswith("Q4_K_M.gguf")
    ]
    assert ranges == ["bytes=2000-"]
    assert store.blob_path(digest).read_bytes() == data


async def test_hf_token_is_sent_as_bearer_token(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.add_repo("org/private", {"p-Q4_K_M.gguf": tiny_gguf("private")}, token="hf_secret")
    store = Store.open(tmp_path / "store")
    with pytest.raises(ModelNotFoundError):
        await pull_model(store, "hf.co/org/private", lambda e: None)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    model = await pull_model(store, "hf.co/org/private", lambda e: None)
    assert model.tags == ("huggingface.co/org/private:latest",)
