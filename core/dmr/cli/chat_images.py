"""Images sent with a chat prompt: `dmr run --image PATH`, and paths named in a prompt.

As `docker model run` does, each image goes inline as an OpenAI `image_url` part
with a `data:` URL, typed by its bytes, and a prompt naming an existing image file
(`./cat.png`, `/tmp/a\\ b.jpg`, `'my photo.webp'`) attaches it and loses the path.
Standard library only: the CLI must start fast (tests/test_cli_fast.py).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmr.cli.errors import CliError
from dmr.image_types import SUPPORTED_FORMATS, sniff_media_type

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_BYTES",
    "image_data_url",
    "images_in_prompt",
    "sniff_media_type",
    "user_message",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
# docker model run's limit; the server's body limit may be lower, and says so.
MAX_IMAGE_BYTES = 100 * 1024 * 1024
_FORMATS = SUPPORTED_FORMATS

_SUFFIX = r"\.(?:png|jpe?g|gif|webp)"
# Quoted paths may hold spaces; a bare one may only escape them (`my\ cat.png`, as a
# terminal writes a dropped file), so that ordinary words around it stay text.
_PATH_IN_PROMPT = re.compile(
    rf"""'(?P<single>[^'\n]+?{_SUFFIX})'"""
    rf'''|"(?P<double>[^"\n]+?{_SUFFIX})"'''
    rf"""|(?<![^\s(\[<])(?P<bare>(?:\\.|[^\s'"\\(\[<])(?:\\.|[^\s'"\\])*?{_SUFFIX})"""
    r"""(?=$|[\s,;:!?.)\]>])""",
    re.IGNORECASE,
)
_ESCAPED = re.compile(r"\\(.)")


def image_data_url(path: Path) -> str:
    """The image file at `path` as a `data:` URL; a `CliError` naming it if it cannot be."""
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise CliError(
                f"image {path}: {size} bytes, more than the {MAX_IMAGE_BYTES // 2**20} MiB limit"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"image {path}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"image {path}: is a directory, not a file") from None
    except OSError as error:
        raise CliError(f"image {path}: cannot read it: {error.strerror or error}") from None
    media_type = sniff_media_type(data)
    if media_type is None:
        raise CliError(f"image {path}: not a {_FORMATS} image")
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def images_in_prompt(prompt: str) -> tuple[str, list[Path]]:
    """The image files `prompt` names that exist, and the prompt without their paths.

    A name that is no file stays in the prompt as text (it may be just a word).
    """
    found: list[Path] = []
    kept: list[str] = []
    end = 0
    for match in _PATH_IN_PROMPT.finditer(prompt):
        bare = match.group("bare")
        text = match.group("single") or match.group("double") or _ESCAPED.sub(r"\1", bare)
        path = Path(text).expanduser()
        if not path.is_file():
            continue
        found.append(path)
        kept.append(prompt[end : match.start()])
        end = match.end()
    kept.append(prompt[end:])
    if not found:
        return prompt, []
    return re.sub(r"[ \t]{2,}", " ", "".join(kept)).strip(), found


def user_message(text: str, image_urls: Sequence[str]) -> dict[str, Any]:
    """A user chat message: plain text, or a text part followed by image parts."""
    if not image_urls:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    return {"role": "user", "content": parts}
