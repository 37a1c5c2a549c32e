"""`dmr run IMAGE_MODEL PROMPT`: ask for images and write them as PNG files."""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["IMAGE_FORMATS", "ImageOptions", "is_image_model", "write_images"]

# Model formats the diffusers engine serves (dmr.formats).
IMAGE_FORMATS = frozenset({"diffusers", "dduf"})


def is_image_model(model: Mapping[str, Any] | None) -> bool:
    """Whether a `GET /models/{name}` answer describes an image-generation model."""
    config = model.get("config") if model else None
    return isinstance(config, Mapping) and config.get("format") in IMAGE_FORMATS


@dataclass(frozen=True)
class ImageOptions:
    """What `dmr run` passes through to `/v1/images/generations`."""

    output_dir: Path = field(default_factory=Path.cwd)
    size: str | None = None
    steps: int | None = None
    seed: int | None = None
    n: int = 1

    def body(self, model: str, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "n": self.n,
            "response_format": "b64_json",
        }
        for name, value in (("size", self.size), ("steps", self.steps), ("seed", self.seed)):
            if value is not None:
                body[name] = value
        return body


def _slug(model: str) -> str:
    name = model.rsplit("/", 1)[-1].split(":", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "image"


def _write_new(folder: Path, stem: str, data: bytes) -> Path:
    """Write `data` to `stem.png`, else `stem-2.png`, ...: never over an existing file."""
    for attempt in range(1, 10_000):
        path = folder / (f"{stem}.png" if attempt == 1 else f"{stem}-{attempt}.png")
        try:
            with path.open("xb") as handle:
                handle.write(data)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"too many images named {stem}*.png in {folder}")


def write_images(answer: Mapping[str, Any], model: str, output_dir: Path) -> list[Path]:
    """Decode an images answer (`{"data": [{"b64_json": ...}]}`) into new PNG files."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    written = []
    for number, item in enumerate(answer.get("data") or [], start=1):
        try:
            data = base64.b64decode(item["b64_json"], validate=True)
        except (KeyError, TypeError, binascii.Error) as error:
            raise ValueError(f"the server sent no image data for image {number}") from error
        written.append(_write_new(output_dir.resolve(), f"{_slug(model)}-{stamp}-{number}", data))
    return written
