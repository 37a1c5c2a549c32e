"""Images through dmr's llama.cpp runner, against native `llama-server --mmproj`.

SmolLM2 plus the random-weight test projector (tests/fixtures/vision_projector.py),
in a store-shaped bundle (`model/model.gguf`, `model/model.mmproj`) that the engine
starts a runner for, as the scheduler does. For the same OpenAI chat request with an
image, the runner's prompt token count and greedy answer must be llama-server's.
Bad images get a 400 and the runner keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dmr.testing import RunnerProcess, make_launch, short_socket
from dmr_llamacpp.engine import LlamaCppEngine

from tests.fixtures.llama_server import build_llama_server, running_llama_server
from tests.fixtures.server import free_port
from tests.fixtures.vision_projector import (
    png_data_url,
    sample_png,
    solid_png,
)

pytestmark = [pytest.mark.llama, pytest.mark.slow]

IMAGE_TOKENS = 64  # (64 px / 8 px)**2, write_test_projector's defaults
MAX_TOKENS = 24
QUESTION = "Describe this image."
MODEL = "ai/vision-test:latest"


def vision_bundle(root: Path, gguf: Path, projector: Path | None) -> Path:
    """A store-shaped bundle linking to the cached weights (and the projector)."""
    folder = root / "bundle" / "model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.gguf").symlink_to(gguf)
    if projector is not None:
        (folder / "model.mmproj").symlink_to(projector)
    return root / "bundle"


def start_runner(bundle: Path, name: str, *, parallel: int) -> RunnerProcess:
    launch = make_launch(
        bundle,
        short_socket(name),
        model_name=MODEL,
        context_size=2048,
        runtime_flags=("--threads", "2"),
        engine_options={"llamacpp": {"parallel": parallel}},
    )
    return RunnerProcess(LlamaCppEngine(), launch)


@pytest.fixture(scope="module")
def vision_runner(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path, projector_path: Path
) -> Iterator[RunnerProcess]:
    bundle = vision_bundle(tmp_path_factory.mktemp("vision-runner"), smollm2_gguf, projector_path)
    runner = start_runner(bundle, "vision", parallel=2)
    yield runner
    runner.stop()


@pytest.fixture(scope="module")
def oracle_url(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path, projector_path: Path
) -> Iterator[str]:
    with running_llama_server(
        build_llama_server(),
        smollm2_gguf,
        free_port(),
        mmproj=projector_path,
        extra_args=["--parallel", "2", "--ctx-size", "4096", "--threads", "2"],
        log=tmp_path_factory.mktemp("vision-oracle") / "llama-server.log",
    ) as url:
        yield url


def image_message(*images: bytes, question: str = QUESTION) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": png_data_url(image)}} for image in images
    ]
    return {"role": "user", "content": [*parts, {"type": "text", "text": question}]}


def greedy(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A greedy request that neither server answers from its prompt cache (unless
    `extra` says so): a prefix decoded in another batch shape can tip a near-tie, so
    answers compared with llama-server's must not depend on what came before."""
    return {
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "cache_prompt": False,
        **extra,
    }


def ask(client: httpx.Client, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    reply = client.post(path, json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def assert_same_answer(mine: dict[str, Any], reference: dict[str, Any]) -> None:
    assert mine["usage"]["prompt_tokens"] == reference["usage"]["prompt_tokens"]
    assert mine["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]
    assert mine["usage"]["completion_tokens"] == reference["usage"]["completion_tokens"]


def test_image_answer_matches_llama_server(vision_runner: RunnerProcess, oracle_url: str) -> None:
    """One image, then two in one message: llama-server's prompt tokens and greedy
    answer, token for token."""
    with vision_runner.client() as runner, httpx.Client(base_url=oracle_url, timeout=120) as native:
        text_body = greedy([{"role": "user", "content": QUESTION}])
        text_only = ask(runner, text_body)
        assert_same_answer(text_only, ask(native, text_body))
        for images in ([sample_png()], [sample_png(seed=1), solid_png((20, 120, 220))]):
            body = greedy([image_message(*images)])
            reference = ask(native, body)
            mine = ask(runner, body)
            assert_same_answer(mine, reference)
            # The images' embeddings and nothing else: no newline next to a marker.
            assert (
                mine["usage"]["prompt_tokens"]
                == text_only["usage"]["prompt_tokens"] + len(images) * IMAGE_TOKENS
            )


def sse_events(lines: list[str]) -> list[Any]:
    import json

    return [
        line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])
        for line in lines
        if line.startswith("data: ")
    ]


def test_streamed_image_answer(vision_runner: RunnerProcess, oracle_url: str) -> None:
    body = greedy([image_message(solid_png((200, 30, 30)))])
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with vision_runner.client() as runner, httpx.Client(base_url=oracle_url, timeout=120) as native:
        reference = ask(native, body)
        with runner.stream("POST", "/v1/chat/completions", json=stream_body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(list(response.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(
        chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"]
    )
    assert text == reference["choices"][0]["message"]["content"]
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == reference["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == reference["usage"]["completion_tokens"]


def test_repeated_image_prompt_comes_from_the_cache(vision_runner: RunnerProcess) -> None:
    """Sent again, the image's cells come from the slot's cache: only the prompt's
    last token is decoded again."""
    body = greedy([image_message(solid_png((90, 60, 30)))], cache_prompt=True)
    with vision_runner.client() as runner:
        first = ask(runner, body)
        again = ask(runner, body)
    assert again["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == again["usage"]["prompt_tokens"] - 1
    assert again["timings"]["prompt_n"] == 1


def test_follow_up_turn_reuses_the_image(vision_runner: RunnerProcess) -> None:
    image = sample_png(seed=7)
    with vision_runner.client() as runner:
        first = ask(runner, greedy([image_message(image)], cache_prompt=True))
        answer = first["choices"][0]["message"]["content"]
        follow_up = [
            image_message(image),
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And what colors does it have?"},
        ]
        second = ask(runner, greedy(follow_up, cache_prompt=True))
    assert second["choices"][0]["message"]["content"]
    # Everything up to the end of the first prompt, the image included, was kept.
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"] - 1
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + IMAGE_TOKENS // 8


def test_concurrent_image_and_text_requests(vision_runner: RunnerProcess) -> None:
    """Two slots, four requests: images and text share the continuous batch."""
    # Short answers: what matters is that each request is served, not its length, and
    # four long ones once passed the client's 120 s on a CI machine busy with other tests.
    bodies = [
        greedy([image_message(sample_png(seed=3))], max_tokens=8),
        greedy([{"role": "user", "content": "Name three colors."}], max_tokens=8),
        greedy(
            [image_message(solid_png((10, 200, 10)), question="What color is it?")],
            max_tokens=8,
        ),
        greedy([{"role": "user", "content": "Count to five."}], max_tokens=8),
    ]

    async def run_all() -> list[httpx.Response]:
        async with vision_runner.async_client(timeout=300) as client:
            return list(
                await asyncio.gather(
                    *(client.post("/v1/chat/completions", json=body) for body in bodies)
                )
            )

    with vision_runner.client() as runner:
        alone = [ask(runner, body)["usage"]["prompt_tokens"] for body in bodies]
    replies = asyncio.run(run_all())
    for reply, prompt_tokens in zip(replies, alone, strict=True):
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["prompt_tokens"] == prompt_tokens


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height (no pixel data follows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def _with_url(url: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]


BAD_IMAGES: dict[str, tuple[list[dict[str, Any]], str]] = {
    "corrupt": (_with_url(png_data_url(b"definitely not an image")), "could not be decoded"),
    "truncated": (_with_url(png_data_url(sample_png()[:60])), "could not be decoded"),
    "100 megapixels": (_with_url(png_data_url(_png_header(10_000, 10_000))), "pixels"),
    "oversized file": (
        _with_url(png_data_url(sample_png() + bytes(10 * 1024 * 1024))),
        "bytes",
    ),
    "data URL without data": (_with_url("data:image/png;base64"), "','"),
    "data URL not base64": (_with_url("data:image/png;base64,@@not base64@@"), "base64"),
    "data URL of text": (
        _with_url("data:text/plain;base64," + base64.b64encode(b"hi").decode()),
        "not an image",
    ),
    "file URL": (_with_url("file:///etc/passwd"), "unsupported URL scheme"),
    "ftp URL": (_with_url("ftp://example.com/cat.png"), "unsupported URL scheme"),
    "loopback URL": (_with_url("http://127.0.0.1:9/cat.png"), "private"),
    "image_url without url": (
        [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        "image_url.url",
    ),
    "too many images": (
        [image_message(*[solid_png((i, i, i), size=8) for i in range(33)])],
        "at most 32",
    ),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_bad_images_are_400s(vision_runner: RunnerProcess, stream: bool) -> None:
    with vision_runner.client() as runner:
        for case, (messages, expected) in BAD_IMAGES.items():
            reply = runner.post(
                "/v1/chat/completions",
                json={"messages": messages, "max_tokens": 4, "stream": stream},
            )
            assert reply.status_code == 400, (case, reply.text)
            error = reply.json()["error"]
            assert error["type"] == "invalid_request_error", case
            assert expected in error["message"], (case, error["message"])
        # Still serving, images included.
        assert runner.get("/health").status_code == 200
        answer = ask(runner, greedy([image_message(sample_png())], max_tokens=4))
        assert answer["choices"][0]["message"]["content"]
    assert vision_runner.process.poll() is None


def test_model_without_projector_refuses_images(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> None:
    bundle = vision_bundle(tmp_path_factory.mktemp("text-runner"), smollm2_gguf, None)
    runner = start_runner(bundle, "text", parallel=1)
    try:
        with runner.client() as client:
            for stream in (False, True):
                reply = client.post(
                    "/v1/chat/completions",
                    json={"messages": [image_message(sample_png())], "stream": stream},
                )
                assert reply.status_code == 400, reply.text
                error = reply.json()["error"]
                assert error["type"] == "invalid_request_error"
                assert MODEL in error["message"] and "image" in error["message"]
            # Text still works.
            answer = ask(client, greedy([{"role": "user", "content": "Hi"}], max_tokens=4))
            assert answer["choices"][0]["message"]["content"]
    finally:
        runner.stop()
