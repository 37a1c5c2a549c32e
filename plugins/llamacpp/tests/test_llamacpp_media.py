"""Images of OpenAI chat requests read into bytes (runner/media.py) and the prompt text
around them (runner/requests.py): no model needed."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Awaitable, Callable

import pytest
from dmr.runner_support import BadRequest
from dmr_llamacpp.runner.media import (
    ImageLimits,
    decode_data_url,
    fetch_image,
    image_dimensions,
    load_images,
)
from dmr_llamacpp.runner.requests import parse_chat_prompt


def _image(fmt: str, size: tuple[int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_dimensions_from_the_header(fmt: str) -> None:
    assert image_dimensions(_image(fmt, (37, 21))) == (37, 21)


def test_dimensions_of_unknown_bytes() -> None:
    assert image_dimensions(b"RIFF....WEBP") is None
    assert image_dimensions(b"") is None


def test_data_urls() -> None:
    png = _image("PNG", (4, 4))
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert decode_data_url(url, 0) == png
    for bad, message in (
        ("data:image/png;base64", "','"),
        ("data:image/png,abcd", "base64 encoded"),
        ("data:text/plain;base64,aGk=", "not an image"),
        ("data:image/png;base64,!!!", "invalid"),
    ):
        with pytest.raises(BadRequest, match=message):
            decode_data_url(bad, 0)


async def test_limits_before_any_decoding() -> None:
    limits = ImageLimits(max_images=2, max_bytes=1000, max_pixels=100)
    small = "data:image/png;base64," + base64.b64encode(_image("PNG", (8, 8))).decode()
    large = "data:image/png;base64," + base64.b64encode(_image("PNG", (20, 20))).decode()
    assert len(await load_images([small], limits)) == 1
    with pytest.raises(BadRequest, match="at most 2"):
        await load_images([small] * 3, limits)
    with pytest.raises(BadRequest, match="20x20 pixels"):
        await load_images([large], limits)
    with pytest.raises(BadRequest, match="unsupported URL scheme 'file'"):
        await load_images(["file:///etc/passwd"], limits)
    with pytest.raises(BadRequest, match="loopback or private"):
        await load_images(["http://127.0.0.1:1/x.png"], limits)
    with pytest.raises(BadRequest, match="loopback or private"):
        await load_images(["http://[::1]:1/x.png"], limits)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class HttpServers:
    """Raw HTTP servers on 127.0.0.1, each answering with one handler (in the test's loop)."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []

    async def start(self, handler: Handler) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await handler(reader, writer)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        for server in self.servers:
            server.close()


def _respond(status: str, body: bytes, headers: str = "") -> Handler:
    async def handler(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}"
        writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    return handler


async def _never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # until the client gives up and closes the connection
    writer.close()


async def test_fetches_http_images() -> None:
    png = _image("PNG", (5, 5))
    allowed = ImageLimits(allow_private_urls=True, fetch_timeout_s=2, max_bytes=4096)
    servers = HttpServers()
    try:
        url = await servers.start(_respond("200 OK", png))
        assert await fetch_image(url + "/cat.png", 0, allowed) == png

        moved = await servers.start(_respond("302 Found", b"", f"Location: {url}/cat.png\r\n"))
        assert await fetch_image(moved + "/old.png", 0, allowed) == png

        missing = await servers.start(_respond("404 Not Found", b"no"))
        with pytest.raises(BadRequest, match="HTTP 404"):
            await fetch_image(missing, 0, allowed)

        huge = await servers.start(_respond("200 OK", bytes(5000)))
        with pytest.raises(BadRequest, match="at most 4096"):
            await fetch_image(huge, 0, allowed)

        silent = await servers.start(_never_answers)
        fast = ImageLimits(allow_private_urls=True, fetch_timeout_s=0.3)
        with pytest.raises(BadRequest, match=r"longer than 0\.3 s"):
            await fetch_image(silent, 0, fast)
    finally:
        servers.close()


def test_prompt_text_around_images() -> None:
    """llama-server's join: text parts on lines of their own, a marker glued to both
    neighbours; text-only part lists on lines of their own too."""
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look:"},
                    {"type": "image_url", "image_url": {"url": "data:one"}},
                    {"type": "text", "text": "and"},
                    {"type": "text", "text": "this"},
                    {"type": "image_url", "image_url": "data:two"},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ]
    }
    prompt = parse_chat_prompt(body, media_marker="<M>")
    assert prompt.messages[0]["content"] == "Look:<M>and\nthis<M>"
    assert prompt.messages[1]["content"] == "a\nb"
    assert prompt.image_urls == ("data:one", "data:two")
    with pytest.raises(BadRequest, match="'input_audio'"):
        parse_chat_prompt({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]})


def test_image_placeholders() -> None:
    """Negative (no vocabulary id), the same for the same image (a follow-up turn
    reuses its cells), different from another image's from the first cell on."""
    from dmr_llamacpp.runner.batching import image_placeholders

    first = image_placeholders("a" * 64, 6)
    assert first == image_placeholders("a" * 64, 6)
    assert len(set(first)) == 6 and all(token < 0 for token in first)
    other = image_placeholders("b" * 64, 6)
    assert first[0] != other[0] and not set(first) & set(other)
    assert image_placeholders("", 3) != image_placeholders("", 3)


async def test_webp_becomes_png() -> None:
    """stb_image (libmtmd's decoder) has no WebP; the runner re-encodes it (Pillow)."""
    webp = _image("WEBP", (6, 4))
    url = "data:image/webp;base64," + base64.b64encode(webp).decode()
    [converted] = await load_images([url], ImageLimits())
    assert converted.startswith(b"\x89PNG") and image_dimensions(converted) == (6, 4)
    broken = "data:image/webp;base64," + base64.b64encode(webp[:20]).decode()
    with pytest.raises(BadRequest, match="could not be decoded"):
        await load_images([broken], ImageLimits())
