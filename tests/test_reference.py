"""Model names normalise exactly as Docker Model Runner's (docs/compatibility.md §1)."""

from __future__ import annotations

import pytest
from dmr.reference import InvalidReferenceError, is_model_id, parse_reference

HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("given", "familiar", "full"),
    [
        ("smollm2", "ai/smollm2:latest", "index.docker.io/ai/smollm2:latest"),
        ("ai/smollm2", "ai/smollm2:latest", "index.docker.io/ai/smollm2:latest"),
        ("ai/SmolLM2:Q4_K_M", "ai/smollm2:Q4_K_M", "index.docker.io/ai/smollm2:Q4_K_M"),
        ("docker.io/ai/smollm2:1", "ai/smollm2:1", "index.docker.io/ai/smollm2:1"),
        ("myorg/model", "myorg/model:latest", "index.docker.io/myorg/model:latest"),
        ("localhost:5000/a/b:v1", "localhost:5000/a/b:v1", "localhost:5000/a/b:v1"),
        ("127.0.0.1:5000/m", "127.0.0.1:5000/m:latest", "127.0.0.1:5000/m:latest"),
        (
            "hf.co/Bartowski/Llama-GGUF:Q8_0",
            "huggingface.co/bartowski/llama-gguf:Q8_0",
            "huggingface.co/bartowski/llama-gguf:Q8_0",
        ),
        (f"ai/x@sha256:{HEX}", f"ai/x@sha256:{HEX}", f"index.docker.io/ai/x@sha256:{HEX}"),
    ],
)
def test_normalisation(given: str, familiar: str, full: str) -> None:
    reference = parse_reference(given)
    assert reference.familiar == familiar
    assert reference.full == full


def test_default_registry_is_overridable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFAULT_REGISTRY", "registry.example:5000")
    reference = parse_reference("smollm2")
    assert reference.full == "registry.example:5000/ai/smollm2:latest"
    assert reference.familiar == "ai/smollm2:latest"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        " ",
        "../etc/passwd",
        "a//b",
        "ai/../x",
        "ai/x:",
        "ai/x:bad tag",
        "a\\b",
        "x@sha256:12",
        "ai/x:" + "t" * 200,
        "UPPER/..",
        "ai/-x",
    ],
)
def test_invalid_references_are_refused(bad: str) -> None:
    with pytest.raises(InvalidReferenceError):
        parse_reference(bad)


def test_model_ids() -> None:
    assert is_model_id(f"sha256:{HEX}")
    assert is_model_id(HEX)
    assert is_model_id(HEX[:12])
    assert not is_model_id("smollm2")


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("smollm2", "ai/smollm2"),
        ("ai/smollm2:latest", "ai/smollm2"),
        ("AI/SmolLM2", "ai/smollm2"),
        ("ai/smollm2:Q4_K_M", "ai/smollm2:Q4_K_M"),
        ("localhost:5000/a/b", "localhost:5000/a/b"),
        (f"sha256:{HEX}", f"sha256:{HEX}"),
    ],
)
def test_display_name_is_one_spelling_per_model(given: str, shown: str) -> None:
    from dmr.reference import display_name

    assert display_name(given) == shown
