"""An image through `dmr serve` end to end: a model packaged with a projector
(`dmr package --mmproj`'s layer), the scheduler's llama.cpp runner, the official
OpenAI client sending an `image_url` data URL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from dmr.distribution.packaging import PackageOptions, package_gguf, write_to_store
from dmr.store import Store

from tests.fixtures.server import DmrServer, start_server
from tests.fixtures.vision_projector import png_data_url, sample_png, write_test_projector

pytestmark = [pytest.mark.llama, pytest.mark.slow]

MODEL = "ai/vision-test"
IMAGE_TOKENS = 64  # write_test_projector's defaults
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def vision_server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> Iterator[DmrServer]:
    tmp = tmp_path_factory.mktemp("dmr-vision")
    projector = write_test_projector(tmp / "mmproj.gguf", smollm2_gguf)
    artifact = package_gguf(
        [smollm2_gguf], PackageOptions(mmproj=projector, created="2024-11-01T00:00:00Z")
    )
    write_to_store(Store.open(tmp / "models"), artifact, [f"{MODEL}:latest"])
    server = start_server(tmp, {"LLAMA_ARGS": "-n 64"})
    yield server
    server.stop()


def test_openai_client_sends_an_image(vision_server: DmrServer) -> None:
    client = openai.OpenAI(base_url=f"{vision_server.url}/engines/v1", api_key="unused")
    text_only = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=8,
        temperature=0,
    )
    picture = {"type": "image_url", "image_url": {"url": png_data_url(sample_png())}}
    with_image = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [picture, {"type": "text", "text": QUESTION}]}],
        max_tokens=8,
        temperature=0,
    )
    assert with_image.choices[0].message.content
    assert text_only.usage is not None and with_image.usage is not None
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + IMAGE_TOKENS

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [picture, {"type": "text", "text": QUESTION}]}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text

    corrupt = {"type": "image_url", "image_url": {"url": png_data_url(b"not an image")}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [corrupt, {"type": "text", "text": QUESTION}]}],
            max_tokens=8,
        )
    assert "could not be decoded" in str(refused.value)
    # The runner survived the bad image.
    again = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [picture, {"type": "text", "text": QUESTION}]}],
        max_tokens=4,
        temperature=0,
    )
    assert again.choices[0].message.content
