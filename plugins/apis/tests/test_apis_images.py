"""The image checks every dialect shares (dmr_apis.common.images), on their own."""

from __future__ import annotations

import base64

import pytest
from dmr.errors import InvalidRequestError
from dmr_apis.common.images import base64_image_url, checked_image_url, sniff_media_type

PNG = b"\x89PNG\r\n\x1a\n" + bytes(8)


@pytest.mark.parametrize(
    ("data", "media_type"),
    [
        (PNG, "image/png"),
        (b"\xff\xd8\xff\xdb" + bytes(4), "image/jpeg"),
        (b"GIF87a" + bytes(4), "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8L", "image/webp"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),  # RIFF, but audio
        (b"BM" + bytes(20), None),  # BMP: not one of the four
        (b"\x89PN", None),  # truncated signature
        (b"", None),
    ],
)
def test_sniff_media_type(data: bytes, media_type: str | None) -> None:
    assert sniff_media_type(data) == media_type


def test_base64_with_line_breaks_is_taken_as_go_takes_it() -> None:
    wrapped = base64.encodebytes(PNG * 8).decode()  # MIME style: a break every 76 chars
    assert "\n" in wrapped
    url = base64_image_url(wrapped, "images[0]")
    assert url == "data:image/png;base64," + base64.b64encode(PNG * 8).decode()


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",  # unclosed IPv6 bracket: urlsplit raises
        "https:///no-host.png",
        "javascript:alert(1)",
        "data:image/png;base64",  # no comma
        "data:;base64,iVBORw0KGgo=",  # no media type
        "",
    ],
)
def test_bad_urls_are_a_400_naming_the_field(url: str) -> None:
    with pytest.raises(InvalidRequestError, match=r"^input\[0\]\.content\[1\]\.image_url: "):
        checked_image_url(url, "input[0].content[1].image_url")


def test_good_urls_pass() -> None:
    assert checked_image_url("HTTPS://images.example/a.png", "x") == "HTTPS://images.example/a.png"
    data = "data:IMAGE/PNG;base64," + base64.b64encode(PNG).decode()
    assert checked_image_url(data, "x") == "data:image/png;base64," + base64.b64encode(PNG).decode()
