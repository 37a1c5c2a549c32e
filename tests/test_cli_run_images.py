"""`dmr run MODEL PROMPT --image PATH` and image paths in a chat message: what the CLI
sends (OpenAI `image_url` parts with data URLs), seen through the test engine's echo
runner, and the one-line errors for a file it cannot send.

The CLI checks an image's signature only (decoding is the runner's work), so the
files here are signatures with a little padding.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import pexpect
import pytest
from dmr.cli.chat_images import image_data_url, images_in_prompt, user_message
from dmr.cli.errors import CliError

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import add_test_model

PNG = b"\x89PNG\r\n\x1a\n" + bytes(24)
JPEG = b"\xff\xd8\xff\xe0" + bytes(16)


def data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def echoed(content: Any, messages: int = 1) -> str:
    """The test runner's answer: the last message's content, as Python prints it."""
    return f"[{messages} messages] echo: {content}"


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "cat.png").write_bytes(PNG)
    (folder / "dog photo.JPG").write_bytes(JPEG)
    (folder / "notes.png").write_bytes(b"plain text wearing a .png name")
    return folder


# --------------------------------------------------------------------------- pure parts


def test_image_data_url_types_the_file_by_its_bytes(pictures: Path) -> None:
    assert image_data_url(pictures / "cat.png") == data_url("image/png", PNG)
    assert image_data_url(pictures / "dog photo.JPG") == data_url("image/jpeg", JPEG)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.png", "no such file"),
        (".", "is a directory, not a file"),
        ("notes.png", "not a PNG, JPEG, GIF or WebP image"),
    ],
)
def test_image_data_url_errors_name_the_file(pictures: Path, name: str, message: str) -> None:
    with pytest.raises(CliError, match=message) as caught:
        image_data_url(pictures / name)
    assert str(caught.value).startswith(f"image {pictures / name}: ")


def test_paths_in_a_prompt(pictures: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(pictures)
    cat, dog = pictures / "cat.png", pictures / "dog photo.JPG"
    assert images_in_prompt(f"what is in {cat}?") == ("what is in ?", [cat])
    assert images_in_prompt("compare ./cat.png and 'dog photo.JPG'") == (
        "compare and",
        [Path("cat.png"), Path("dog photo.JPG")],
    )
    escaped = str(dog).replace(" ", "\\ ")  # as a terminal writes a dropped file
    assert images_in_prompt(f"{escaped} describe") == ("describe", [dog])
    # Names of no file stay words of the prompt.
    assert images_in_prompt("draw me a cat.gif and /no/such.png") == (
        "draw me a cat.gif and /no/such.png",
        [],
    )


def test_user_message_shapes() -> None:
    assert user_message("hi", []) == {"role": "user", "content": "hi"}
    assert user_message("", ["data:x"]) == {"role": "user", "content": [image_part("data:x")]}
    assert user_message("hi", ["data:x"])["content"][0] == {"type": "text", "text": "hi"}


# --------------------------------------------------------------------------- dmr run


def test_run_sends_each_image_after_the_prompt(
    test_engine_server: DmrServer, pictures: Path
) -> None:
    add_test_model(test_engine_server.models_path, "test/a")

    result = test_engine_server.cli(
        "run", "test/a", "describe these",
        "--image", str(pictures / "cat.png"), "--image", str(pictures / "dog photo.JPG"),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    content = [
        {"type": "text", "text": "describe these"},
        image_part(data_url("image/png", PNG)),
        image_part(data_url("image/jpeg", JPEG)),
    ]
    assert result.stdout == echoed(content) + "\n"


def test_run_attaches_an_image_path_named_in_the_prompt(
    test_engine_server: DmrServer, pictures: Path
) -> None:
    add_test_model(test_engine_server.models_path, "test/a")

    result = test_engine_server.cli("run", "test/a", f"what is in {pictures / 'cat.png'}")

    assert result.returncode == 0, result.stderr
    content = [{"type": "text", "text": "what is in"}, image_part(data_url("image/png", PNG))]
    assert result.stdout == echoed(content) + "\n"


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.png", "no such file"), ("notes.png", "not a PNG, JPEG, GIF or WebP image")],
)
def test_run_image_errors_are_one_line(
    test_engine_server: DmrServer, pictures: Path, name: str, message: str
) -> None:
    add_test_model(test_engine_server.models_path, "test/a")

    result = test_engine_server.cli("run", "test/a", "hi", "--image", str(pictures / name))

    assert result.returncode == 1
    assert result.stderr == f"error: image {pictures / name}: {message}\n"
    assert result.stdout == ""


def test_interactive_chat_attaches_image_paths(
    test_engine_server: DmrServer, pictures: Path
) -> None:
    add_test_model(test_engine_server.models_path, "test/a")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "dmr", "run", "test/a"],
        env=test_engine_server.env,
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 200),
    )
    try:
        child.expect_exact("> ")
        child.sendline(f"{pictures / 'cat.png'} what is this?")
        child.expect_exact(f"Added image '{pictures / 'cat.png'}'")
        image = image_part(data_url("image/png", PNG))
        child.expect_exact(echoed([{"type": "text", "text": "what is this?"}, image]))

        child.expect_exact("> ")
        child.sendline(f"and {pictures / 'notes.png'}")
        child.expect_exact("not a PNG, JPEG, GIF or WebP image")  # said, nothing sent

        child.expect_exact("> ")
        child.sendline("thanks")
        child.expect_exact(echoed("thanks", messages=3))  # the image turn stays in history
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
