"""Images in dialect requests, checked here and sent on as OpenAI `image_url` parts.

Each dialect wraps an image its own way (Ollama: bare base64; Anthropic: base64 with
a declared media type, or a URL; Responses: a data or http(s) URL), and the runner
reads OpenAI chat's `image_url` parts. Every dialect builds its parts here, so what
no runner could use is refused with a 400 before the request waits for a model:
text that is not base64, a format other than the four every client documents (PNG,
JPEG, GIF, WebP), a declared type the bytes contradict, a URL of another scheme.
Decoding the pixels (a corrupt or truncated body) and fetching URLs stay the
runner's work.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import urlsplit

from dmr.sdk import InvalidRequestError
from dmr.sdk.dialect import SUPPORTED_FORMATS, SUPPORTED_MEDIA_TYPES, sniff_media_type

__all__ = [
    "SUPPORTED_MEDIA_TYPES",
    "base64_image_url",
    "checked_image_url",
    "http_image_url",
    "image_url_part",
    "sniff_media_type",
]

_FORMATS = SUPPORTED_FORMATS


def _decode(text: str, where: str) -> tuple[str, bytes]:
    """The base64 text without line breaks (Go's decoder skips them) and its bytes."""
    if "\n" in text or "\r" in text:
        text = text.replace("\r", "").replace("\n", "")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{where}: the image is not valid base64") from None
    if not data:
        raise InvalidRequestError(f"{where}: the image is empty")
    return text, data


def base64_image_url(data: str, where: str, *, media_type: str | None = None) -> str:
    """A `data:` URL for a base64 image, typed by its bytes.

    `media_type`, when the client declared one, must be supported and match the bytes.
    """
    if media_type is not None and media_type not in SUPPORTED_MEDIA_TYPES:
        raise InvalidRequestError(
            f"{where}: unsupported image type {media_type!r}; send {_FORMATS}"
        )
    text, raw = _decode(data, where)
    found = sniff_media_type(raw)
    if found is None:
        raise InvalidRequestError(f"{where}: the data is not a {_FORMATS} image")
    if media_type is not None and media_type != found:
        raise InvalidRequestError(
            f"{where}: Image does not match the provided media type {media_type} "
            f"(the data is {found})"
        )
    return f"data:{found};base64,{text}"


def http_image_url(url: str, where: str) -> str:
    """An http(s) URL, passed on for the runner to fetch (with its own limits)."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        valid = False
    if not valid:
        raise InvalidRequestError(f"{where}: an image URL must be an http(s) URL with a host")
    return url


def checked_image_url(url: str, where: str) -> str:
    """A `data:` URL (checked as base64 with its declared type) or an http(s) URL."""
    if url[:5].lower() == "data:":
        header, comma, payload = url[5:].partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise InvalidRequestError(
                f"{where}: a data: URL must carry base64 (data:image/png;base64,...)"
            )
        media_type = header.split(";", 1)[0].strip().lower()
        return base64_image_url(payload, where, media_type=media_type)
    if url.partition(":")[0].lower() in ("http", "https"):
        return http_image_url(url, where)
    raise InvalidRequestError(
        f"{where}: an image URL must be a data: URL (data:image/png;base64,...) or an http(s) URL"
    )


def image_url_part(url: str, detail: str | None = None) -> dict[str, Any]:
    """OpenAI chat's image content part."""
    image_url: dict[str, Any] = {"url": url}
    if detail is not None:
        image_url["detail"] = detail
    return {"type": "image_url", "image_url": image_url}
