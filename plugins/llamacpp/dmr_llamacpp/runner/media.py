"""The images of an OpenAI chat request: `image_url` parts read into file bytes.

A part's URL is a `data:image/...;base64,` URL (the bytes inline) or an http(s) URL
the runner downloads. Everything a client controls is bounded before libmtmd sees
it: the number of images, each file's size, each image's pixel count (read from its
header, so a 100-megapixel PNG is refused without being decoded), and a download's
time. A URL naming a loopback, private, link-local or otherwise non-public address
is refused unless `DMR_IMAGE_URLS_ALLOW_PRIVATE=1` (the runner would otherwise reach
services on its own host or network for whoever can send a request). Every refusal
is a `BadRequest` (a 400): the runner keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx
from dmr.sdk.runner import BadRequest, sniff_media_type

__all__ = [
    "ImageLimits",
    "decode_data_url",
    "fetch_image",
    "image_dimensions",
    "load_images",
]

_PARAM = "messages"


@dataclass(frozen=True)
class ImageLimits:
    """Per-request bounds on images (defaults: llama-server's 10 MB and 10 s downloads)."""

    max_images: int = 32
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 50_000_000
    fetch_timeout_s: float = 10.0
    max_redirects: int = 3
    allow_private_urls: bool = False

    @classmethod
    def from_environment(cls) -> ImageLimits:
        """The defaults, with `DMR_IMAGE_URLS_ALLOW_PRIVATE=1` allowing private addresses."""
        allow = os.environ.get("DMR_IMAGE_URLS_ALLOW_PRIVATE", "").lower() in {"1", "true", "yes"}
        return cls(allow_private_urls=allow)


def decode_data_url(url: str, index: int) -> bytes:
    """The bytes of a `data:image/<type>;base64,<data>` URL."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise BadRequest(f"image {index}: a data URL needs a ',' before its data", _PARAM)
    media_type, _, encoding = header[len("data:") :].partition(";")
    if not media_type.startswith("image/"):
        raise BadRequest(
            f"image {index}: the data URL's media type is {media_type or 'missing'!r}, "
            "not an image/... type",
            _PARAM,
        )
    if not encoding.endswith("base64"):
        raise BadRequest(f"image {index}: the data URL must be base64 encoded", _PARAM)
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"image {index}: the data URL's base64 data is invalid", _PARAM) from None


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF, BMP or JPEG header; None for other formats
    (libmtmd then decides) or a header too short to tell."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return width, height
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    if data[:2] == b"\xff\xd8":
        return _jpeg_dimensions(data)
    return None


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    # Start-of-frame markers (baseline, progressive, ...): not DHT (C4), JPG (C8), DAC (CC).
    frames = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            offset += 2
            continue
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        if marker in frames:
            if offset + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[offset + 5 : offset + 9])
            return width, height
        offset += 2 + length
    return None


def _is_webp(data: bytes) -> bool:
    return sniff_media_type(data) == "image/webp"


def _webp_as_png(data: bytes, index: int, limits: ImageLimits) -> bytes:
    """A WebP image re-encoded as PNG: libmtmd's decoder (stb_image) has no WebP, and
    every dialect's clients may send it. Pillow is imported here, not at start-up:
    most requests have no WebP image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["WEBP"]) as picture:
            width, height = picture.size  # from the header: checked before decoding
            if width * height > limits.max_pixels:
                raise BadRequest(
                    f"image {index} is {width}x{height} pixels; at most {limits.max_pixels} "
                    "pixels are accepted",
                    _PARAM,
                )
            converted = io.BytesIO()
            picture.convert("RGB").save(converted, format="PNG")
    except BadRequest:
        raise
    except (OSError, ValueError, Image.DecompressionBombError):
        raise BadRequest(
            f"image {index} could not be decoded (a corrupt WebP image)", _PARAM
        ) from None
    return converted.getvalue()


def check_image(data: bytes, index: int, limits: ImageLimits) -> bytes:
    """`data` if it is within the limits (a WebP image comes back as PNG)."""
    if not data:
        raise BadRequest(f"image {index} is empty", _PARAM)
    if len(data) > limits.max_bytes:
        raise BadRequest(
            f"image {index} is {len(data)} bytes; at most {limits.max_bytes} are accepted", _PARAM
        )
    dimensions = image_dimensions(data)
    if dimensions is not None and dimensions[0] * dimensions[1] > limits.max_pixels:
        width, height = dimensions
        raise BadRequest(
            f"image {index} is {width}x{height} pixels; at most {limits.max_pixels} pixels "
            "are accepted",
            _PARAM,
        )
    if _is_webp(data):
        return _webp_as_png(data, index, limits)
    return data


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def _check_host(url: str, index: int, limits: ImageLimits) -> None:
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 0
    if parts.scheme not in ("http", "https") or not parts.hostname or not port:
        raise BadRequest(
            f"image {index}: unsupported URL {url[:80]!r}; use a data: URL or http(s)", _PARAM
        )
    if limits.allow_private_urls:
        return
    try:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except OSError as error:
        message = f"image {index}: cannot resolve {parts.hostname}: {error}"
        raise BadRequest(message, _PARAM) from None
    for info in infos:
        if not _is_public(str(info[4][0])):
            raise BadRequest(
                f"image {index}: {parts.hostname} is a loopback or private address; the runner "
                "only fetches public URLs (DMR_IMAGE_URLS_ALLOW_PRIVATE=1 allows others)",
                _PARAM,
            )


async def fetch_image(url: str, index: int, limits: ImageLimits) -> bytes:
    """Download an http(s) image, within the size and time limits; redirects are
    followed by hand so each hop's address is checked too."""
    try:
        return await asyncio.wait_for(_download(url, index, limits), limits.fetch_timeout_s)
    except TimeoutError:
        raise BadRequest(
            f"image {index}: fetching it took longer than {limits.fetch_timeout_s:g} s", _PARAM
        ) from None
    except httpx.HTTPError as error:
        raise BadRequest(f"image {index}: fetching it failed: {error}", _PARAM) from None


async def _download(url: str, index: int, limits: ImageLimits) -> bytes:
    # The whole download's deadline is fetch_image's; httpx's own would end it with a
    # less clear error.
    timeout = limits.fetch_timeout_s + 5
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
        for _hop in range(limits.max_redirects + 1):
            await _check_host(url, index, limits)
            async with client.stream("GET", url) as response:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise BadRequest(
                        f"image {index}: fetching it answered HTTP {response.status_code}", _PARAM
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limits.max_bytes:
                    raise BadRequest(
                        f"image {index} is {declared} bytes; at most {limits.max_bytes} "
                        "are accepted",
                        _PARAM,
                    )
                body = bytearray()
                async for piece in response.aiter_bytes():
                    body += piece
                    if len(body) > limits.max_bytes:
                        raise BadRequest(
                            f"image {index} is larger than {limits.max_bytes} bytes", _PARAM
                        )
                return bytes(body)
    raise BadRequest(f"image {index}: too many redirects", _PARAM)


async def _load_one(url: str, index: int, limits: ImageLimits) -> bytes:
    if not isinstance(url, str) or not url:
        raise BadRequest(f"image {index}: 'image_url.url' must be a non-empty string", _PARAM)
    if url.startswith("data:"):
        data = decode_data_url(url, index)
    elif url.startswith(("http://", "https://")):
        data = await fetch_image(url, index, limits)
    else:
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise BadRequest(
            f"image {index}: unsupported URL scheme {scheme!r}; use a data:image/...;base64 "
            "URL or an http(s) URL",
            _PARAM,
        )
    if _is_webp(data):  # decoded and re-encoded: not on the event loop
        return await asyncio.to_thread(check_image, data, index, limits)
    return check_image(data, index, limits)


async def load_images(urls: Sequence[str], limits: ImageLimits) -> list[bytes]:
    """The file bytes of each image, in order (downloads run at the same time)."""
    if len(urls) > limits.max_images:
        raise BadRequest(
            f"the request has {len(urls)} images; at most {limits.max_images} are accepted",
            _PARAM,
        )
    return list(
        await asyncio.gather(*(_load_one(url, index, limits) for index, url in enumerate(urls)))
    )
