"""An image through `dmr serve` end to end: a model packaged with a projector
(`dmr package --mmproj`'s layer), the scheduler's llama.cpp runner, and each
dialect's official client (OpenAI chat and Responses, Ollama, Anthropic). An image
that reached the model shows as its 64 image tokens in the dialect's prompt count."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest

from tests.fixtures.server import DmrServer, start_server
from tests.fixtures.store import package_smollm2
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
    package_smollm2(tmp / "models", smollm2_gguf, f"{MODEL}:latest", mmproj=projector)
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


def test_ollama_client_sends_an_image(vision_server: DmrServer) -> None:
    client = ollama.Client(host=vision_server.url)
    options = {"num_predict": 4, "temperature": 0}
    text_only = client.chat(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], options=options
    )
    with_image = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION, "images": [sample_png()]}],
        options=options,
    )
    assert with_image.message.content
    assert with_image.prompt_eval_count == (text_only.prompt_eval_count or 0) + IMAGE_TOKENS
    generated = client.generate(
        model=MODEL, prompt=QUESTION, images=[sample_png()], options=options
    )
    assert generated.response
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTION, "images": [b"not an image"]}],
            options=options,
        )
    assert refused.value.status_code == 400


def prompt_tokens(usage: anthropic.types.Usage) -> int:
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


def test_anthropic_client_sends_an_image(vision_server: DmrServer) -> None:
    client = anthropic.Anthropic(
        base_url=f"{vision_server.url}/anthropic", api_key="unused", max_retries=0
    )
    text_only = client.messages.create(
        model=MODEL, max_tokens=4, messages=[{"role": "user", "content": QUESTION}]
    )
    data = base64.b64encode(sample_png()).decode()
    source = {"type": "base64", "media_type": "image/png", "data": data}
    image: Any = {"type": "image", "source": source}
    question: Any = {"type": "text", "text": QUESTION}
    with_image = client.messages.create(
        model=MODEL,
        max_tokens=4,
        messages=[{"role": "user", "content": [image, question]}],
    )
    assert with_image.content
    # Anthropic counts cached prompt tokens apart from the rest.
    assert prompt_tokens(with_image.usage) == prompt_tokens(text_only.usage) + IMAGE_TOKENS
    wrong_type: Any = {"type": "image", "source": {**source, "media_type": "image/jpeg"}}
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=[
                {"role": "user", "content": [wrong_type, {"type": "text", "text": QUESTION}]}
            ],
        )


def test_responses_api_sends_an_image(vision_server: DmrServer) -> None:
    client = openai.OpenAI(base_url=f"{vision_server.url}/engines/v1", api_key="unused")
    text_only = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=4)
    with_image = client.responses.create(
        model=MODEL,
        input=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_image",
                        "image_url": png_data_url(sample_png()),
                        "detail": "auto",
                    },
                    {"type": "input_text", "text": QUESTION},
                ],
            }
        ],
        max_output_tokens=4,
    )
    assert text_only.usage is not None and with_image.usage is not None
    assert with_image.usage.input_tokens == text_only.usage.input_tokens + IMAGE_TOKENS
