"""Images through every dialect, against a scripted runner: what each dialect sends the
runner (OpenAI `image_url` parts with data URLs), and the 400 each answers, in its own
error shape and before the runner hears of it, for an image it cannot pass on.

The dialects check the bytes' signature only (decoding the pixels is the runner's
work), so the images here are signatures with a little padding.
"""

from __future__ import annotations

import base64
from typing import Any

import anthropic
import httpx
import ollama
import pytest
from apis_harness import Harness, add_gguf_model

PNG = b"\x89PNG\r\n\x1a\n" + bytes(24)
JPEG = b"\xff\xd8\xff\xe0" + bytes(16)
GIF = b"GIF89a" + bytes(10)
WEBP = b"RIFF" + (20).to_bytes(4, "little") + b"WEBPVP8 " + bytes(12)
NOT_AN_IMAGE = b"just some text, not pixels"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{b64(data)}"


def image_part(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


async def _post(harness: Harness, path: str, body: dict[str, Any]) -> httpx.Response:
    async with harness.asgi_client() as http:
        return await http.post(path, json=body)


# --------------------------------------------------------------------------- Ollama


async def test_ollama_chat_images_are_sniffed_into_data_urls(harness: Harness) -> None:
    reply = await harness.ollama().chat(
        model="smollm2",
        messages=[{"role": "user", "content": "what is this", "images": [PNG, JPEG]}],
        stream=False,
    )
    assert reply.message.content == "Hello there"
    assert harness.runner.last["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                image_part(data_url("image/png", PNG)),
                image_part(data_url("image/jpeg", JPEG)),
            ],
        }
    ]


async def test_ollama_generate_images_follow_the_prompt(harness: Harness) -> None:
    reply = await harness.ollama().generate(
        model="smollm2", prompt="describe", system="Be brief.", images=[GIF, WEBP], stream=False
    )
    assert reply.response == "Hello there"
    assert harness.runner.requests[-1][0] == "/v1/chat/completions"
    assert harness.runner.last["messages"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "describe"},
                image_part(data_url("image/gif", GIF)),
                image_part(data_url("image/webp", WEBP)),
            ],
        },
    ]


async def test_ollama_generate_an_image_without_a_prompt_is_a_request(harness: Harness) -> None:
    # An empty prompt alone only loads the model; with an image it asks about the image.
    answer = await _post(
        harness, "/api/generate", {"model": "smollm2", "images": [b64(PNG)], "stream": False}
    )
    assert answer.status_code == 200, answer.text
    assert harness.runner.last["messages"] == [
        {"role": "user", "content": [image_part(data_url("image/png", PNG))]}
    ]


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (["not base64 at all!"], "messages[0].images[0]: the image is not valid base64"),
        ([b64(NOT_AN_IMAGE)], "messages[0].images[0]: the data is not a PNG, JPEG, GIF or WebP"),
        ([b64(PNG), ""], "messages[0].images[1]: the image is empty"),
        ([42], "messages[0].images[0] must be a base64 string"),
        (b64(PNG), "'messages[0].images' must be an array of base64 strings"),
        ([data_url("image/bmp", PNG)], "unsupported image type 'image/bmp'"),
    ],
)
async def test_ollama_chat_refuses_bad_images(harness: Harness, images: Any, message: str) -> None:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "hi", "images": images}],
        "stream": False,
    }
    answer = await _post(harness, "/api/chat", body)
    assert answer.status_code == 400
    assert message in answer.json()["error"]  # Ollama's shape: {"error": "..."}
    assert harness.runner.requests == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"images": [b64(NOT_AN_IMAGE)]}, "images[0]: the data is not a PNG, JPEG, GIF or WebP"),
        ({"images": [b64(PNG)], "raw": True}, "'images' cannot be sent with 'raw': true"),
    ],
)
async def test_ollama_generate_refuses_bad_images(
    harness: Harness, extra: dict[str, Any], message: str
) -> None:
    body = {"model": "smollm2", "prompt": "hi", "stream": False, **extra}
    answer = await _post(harness, "/api/generate", body)
    assert answer.status_code == 400
    assert message in answer.json()["error"]
    assert harness.runner.requests == []


async def test_ollama_client_sees_the_error(harness: Harness) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        await harness.ollama().chat(
            model="smollm2",
            messages=[{"role": "user", "content": "hi", "images": [NOT_AN_IMAGE]}],
            stream=False,
        )
    assert caught.value.status_code == 400
    assert "not a PNG, JPEG, GIF or WebP image" in caught.value.error


# --------------------------------------------------------------------------- Anthropic


async def test_anthropic_base64_and_url_images(harness: Harness) -> None:
    message = await harness.anthropic().messages.create(
        model="ai/smollm2",
        max_tokens=8,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": b64(PNG)},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://images.example/cat.jpg"},
                    },
                    {"type": "text", "text": "Compare them."},
                ],
            }
        ],
    )
    assert message.content[0].type == "text"
    assert harness.runner.last["messages"] == [
        {
            "role": "user",
            "content": [
                image_part(data_url("image/png", PNG)),
                image_part("https://images.example/cat.jpg"),
                {"type": "text", "text": "Compare them."},
            ],
        }
    ]


async def test_anthropic_tool_result_images_follow_the_tool_message(harness: Harness) -> None:
    await harness.anthropic().messages.create(
        model="ai/smollm2",
        max_tokens=8,
        messages=[
            {"role": "user", "content": "Take a screenshot."},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [
                            {"type": "text", "text": "here it is"},
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/jpeg",
                                    "data": b64(JPEG),
                                },
                            },
                        ],
                    }
                ],
            },
        ],
    )
    sent = harness.runner.last["messages"]
    assert sent[-2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "here it is"}
    assert sent[-1] == {"role": "user", "content": [image_part(data_url("image/jpeg", JPEG))]}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            {"type": "base64", "media_type": "image/bmp", "data": b64(PNG)},
            "messages.0.content.0.image.source.base64.media_type: Input should be "
            "'image/jpeg', 'image/png', 'image/gif' or 'image/webp'",
        ),
        (
            {"type": "base64", "media_type": "image/png", "data": "%%%"},
            "messages.0.content.0.image.source.base64.data: the image is not valid base64",
        ),
        (
            {"type": "base64", "media_type": "image/jpeg", "data": b64(PNG)},
            "messages.0.content.0.image.source.base64.data: Image does not match the "
            "provided media type image/jpeg",
        ),
        (
            {"type": "base64", "media_type": "image/png", "data": b64(NOT_AN_IMAGE)},
            "source.base64.data: the data is not a PNG, JPEG, GIF or WebP image",
        ),
        ({"type": "base64", "media_type": "image/png"}, "source.base64.data: Input should be"),
        ({"type": "url", "url": "file:///etc/passwd"}, "must be an http(s) URL"),
        ({"type": "url", "url": "https://"}, "must be an http(s) URL with a host"),
        ({"type": "file", "file_id": "file_1"}, "file sources (the Files API) are not supported"),
        ({"type": "hologram"}, "source.type: Input should be 'base64' or 'url'"),
        (None, "an image block needs a 'source' object"),
    ],
)
async def test_anthropic_refuses_bad_images(
    harness: Harness, source: dict[str, Any] | None, message: str
) -> None:
    block: dict[str, Any] = {"type": "image", "source": source}
    body = {
        "model": "ai/smollm2",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": [block, {"type": "text", "text": "hi"}]}],
    }
    answer = await _post(harness, "/anthropic/v1/messages", body)
    assert answer.status_code == 400
    error = answer.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert message in error["error"]["message"]
    assert harness.runner.requests == []


async def test_anthropic_client_sees_the_error(harness: Harness) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        await harness.anthropic().messages.create(
            model="ai/smollm2",
            max_tokens=8,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/gif",
                                "data": b64(PNG),
                            },
                        }
                    ],
                }
            ],
        )
    assert "Image does not match the provided media type image/gif" in str(caught.value)


# --------------------------------------------------------------------------- Responses


async def test_responses_input_images(harness: Harness) -> None:
    response = await harness.openai().responses.create(
        model="ai/smollm2",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in these?"},
                    {"type": "input_image", "image_url": data_url("image/webp", WEBP)},
                    {
                        "type": "input_image",
                        "image_url": "http://images.example/a.png",
                        "detail": "low",
                    },
                ],
            }
        ],
    )
    assert response.output_text == "Hello there"
    assert harness.runner.last["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                image_part(data_url("image/webp", WEBP)),
                image_part("http://images.example/a.png", detail="low"),
            ],
        }
    ]


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (
            {"type": "input_image", "image_url": data_url("image/bmp", PNG)},
            "input[0].content[0].image_url: unsupported image type 'image/bmp'",
        ),
        (
            {"type": "input_image", "image_url": "data:image/png;base64,@@@@"},
            "input[0].content[0].image_url: the image is not valid base64",
        ),
        (
            {"type": "input_image", "image_url": "data:image/png,rawbytes"},
            "a data: URL must carry base64",
        ),
        (
            {"type": "input_image", "image_url": data_url("image/png", JPEG)},
            "Image does not match the provided media type image/png (the data is image/jpeg)",
        ),
        (
            {"type": "input_image", "image_url": "ftp://images.example/a.png"},
            "must be a data: URL (data:image/png;base64,...) or an http(s) URL",
        ),
        ({"type": "input_image", "file_id": "file-1"}, "uploaded files are not supported"),
        ({"type": "input_image"}, "input[0].content[0].image_url must be a string"),
        (
            {"type": "input_image", "image_url": data_url("image/png", PNG), "detail": "max"},
            "input[0].content[0].detail must be one of auto, low, high",
        ),
    ],
)
async def test_responses_refuses_bad_images(
    harness: Harness, part: dict[str, Any], message: str
) -> None:
    body = {"model": "ai/smollm2", "input": [{"role": "user", "content": [part]}]}
    answer = await _post(harness, "/v1/responses", body)
    assert answer.status_code == 400
    error = answer.json()["error"]  # OpenAI's shape
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]
    assert harness.runner.requests == []


# --------------------------------------------------------------------------- OpenAI chat


async def test_openai_chat_image_parts_pass_through_unchanged(harness: Harness) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                image_part(data_url("image/png", PNG), detail="high"),
                image_part("https://images.example/cat.jpg"),
            ],
        }
    ]
    completion = await harness.openai().chat.completions.create(
        model="ai/smollm2",
        messages=messages,
    )
    assert completion.choices[0].message.content == "Hello there"
    assert harness.runner.last["messages"] == messages


# --------------------------------------------------------------------------- capabilities


async def test_a_projector_makes_a_vision_model(harness: Harness) -> None:
    add_gguf_model(harness.store, "ai/looker:latest", mmproj=b"GGUF fake projector")
    client = harness.ollama()
    assert "vision" in ((await client.show("ai/looker")).capabilities or [])
    assert "vision" not in ((await client.show("ai/smollm2")).capabilities or [])
    async with harness.asgi_client() as http:  # what `dmr inspect` prints
        assert (await http.get("/models/ai/looker")).json()["capabilities"] == ["vision"]
        assert (await http.get("/models/ai/smollm2")).json()["capabilities"] == []
