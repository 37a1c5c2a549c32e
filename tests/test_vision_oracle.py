"""The oracle for images: native `llama-server --mmproj` with SmolLM2 and the test
projector (tests/fixtures/vision_projector.py) answers an OpenAI chat request that
carries an image, counting the image's embeddings in its prompt tokens.

dmr's runner is compared with this server (tests/test_vision_runner_unit.py); this
file only shows that the server takes the generated pair as a vision model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.llama_server import build_llama_server, running_llama_server
from tests.fixtures.server import free_port
from tests.fixtures.vision_projector import (
    png_data_url,
    sample_png,
    write_test_projector,
)

pytestmark = [pytest.mark.llama, pytest.mark.slow]

# (64 px / 8 px patches)**2 with write_test_projector's defaults.
IMAGE_TOKENS = 64
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def mmproj_server(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("vision-oracle")
    projector = write_test_projector(folder / "mmproj.gguf", smollm2_gguf)
    with running_llama_server(
        build_llama_server(),
        smollm2_gguf,
        free_port(),
        mmproj=projector,
        extra_args=["--parallel", "1", "--ctx-size", "4096"],
        log=folder / "llama-server.log",
    ) as url:
        yield url


def _chat(url: str, content: object) -> dict:
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 12,
            "temperature": 0,
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_llama_server_counts_image_tokens(mmproj_server: str) -> None:
    props = httpx.get(f"{mmproj_server}/props", timeout=10).json()
    assert props["modalities"]["vision"] is True

    text_only = _chat(mmproj_server, [{"type": "text", "text": QUESTION}])
    with_image = _chat(
        mmproj_server,
        [
            {"type": "image_url", "image_url": {"url": png_data_url(sample_png())}},
            {"type": "text", "text": QUESTION},
        ],
    )
    assert with_image["choices"][0]["message"]["content"]
    # The image adds exactly its embeddings: the marker sits between "user\n" and the
    # question, where the text-only prompt splits into the same tokens.
    assert (
        with_image["usage"]["prompt_tokens"] == text_only["usage"]["prompt_tokens"] + IMAGE_TOKENS
    )


def test_llama_server_rejects_corrupt_image(mmproj_server: str) -> None:
    reply = httpx.post(
        f"{mmproj_server}/v1/chat/completions",
        json={
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": png_data_url(b"not a png")}},
                        {"type": "text", "text": QUESTION},
                    ],
                }
            ],
            "max_tokens": 4,
        },
        timeout=60,
    )
    assert reply.status_code in (400, 500), reply.text
    # The server survives it.
    assert httpx.get(f"{mmproj_server}/health", timeout=10).status_code == 200
