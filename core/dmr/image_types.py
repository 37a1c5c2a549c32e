"""The image formats every dmr surface takes, told by their bytes' signatures.

PNG, JPEG, GIF and WebP: the four that Ollama, Anthropic and OpenAI document, checked
by the same fixed signatures Go's `http.DetectContentType` uses for Ollama and
`docker model run`. Standard library only: the CLI imports this and must start fast
(tests/test_cli_fast.py), and the dialects check every image sent to the server.
"""

from __future__ import annotations

__all__ = ["SUPPORTED_FORMATS", "SUPPORTED_MEDIA_TYPES", "sniff_media_type"]

SUPPORTED_MEDIA_TYPES: tuple[str, ...] = ("image/jpeg", "image/png", "image/gif", "image/webp")
SUPPORTED_FORMATS = "PNG, JPEG, GIF or WebP"


def sniff_media_type(data: bytes) -> str | None:
    """The media type the bytes' signature names, among SUPPORTED_MEDIA_TYPES."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None
