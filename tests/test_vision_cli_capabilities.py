"""A model packaged with a projector (mmproj) reports the vision capability: in
`dmr inspect` and `dmr show` (the store's `GET /models/{name}`) and in Ollama's
`/api/show` `capabilities`, as Ollama does. Nothing is loaded: the capability is
the artifact's, read from the store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from tests.fixtures.server import DmrServer, start_server
from tests.fixtures.store import package_smollm2
from tests.fixtures.vision_projector import write_test_projector

VISION_TAG = "ai/smollm2-vision:latest"


@pytest.fixture(scope="module")
def vision_server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> Iterator[DmrServer]:
    """A server whose store holds SmolLM2 alone and SmolLM2 with a projector."""
    tmp = tmp_path_factory.mktemp("dmr-vision-capabilities")
    projector = write_test_projector(tmp / "mmproj.gguf", smollm2_gguf)
    package_smollm2(tmp / "models", smollm2_gguf)
    package_smollm2(tmp / "models", smollm2_gguf, VISION_TAG, mmproj=projector)
    server = start_server(tmp)
    yield server
    server.stop()


def test_inspect_and_show_report_vision(vision_server: DmrServer) -> None:
    inspected = vision_server.cli("inspect", "ai/smollm2-vision")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["capabilities"] == ["vision"]
    text_only = vision_server.cli("inspect", "ai/smollm2")
    assert json.loads(text_only.stdout)["capabilities"] == []

    shown = vision_server.cli("show", "ai/smollm2-vision")
    assert shown.returncode == 0, shown.stderr
    assert any(line.split() == ["Capabilities", "vision"] for line in shown.stdout.splitlines())
    assert "Capabilities" not in vision_server.cli("show", "ai/smollm2").stdout


def test_ollama_show_lists_vision(vision_server: DmrServer) -> None:
    client = ollama.Client(host=vision_server.url)
    assert "vision" in (client.show("ai/smollm2-vision").capabilities or [])
    assert "vision" not in (client.show("ai/smollm2").capabilities or [])
