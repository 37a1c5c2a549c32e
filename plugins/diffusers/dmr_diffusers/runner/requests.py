"""Turning an OpenAI images request body into checked generation parameters.

Pure Python (no torch), so every refusal is a 400 with a clear message before
the pipeline sees the request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dmr.sdk.runner import BadRequest

__all__ = ["MAX_IMAGES", "BadRequest", "ImageRequest", "parse_image_request"]

MAX_IMAGES = 10  # OpenAI's limit for `n`
MAX_SIDE = 4096
MAX_STEPS = 500
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes any unsigned 64-bit value
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    n: int = 1
    width: int | None = None  # None: the pipeline's default size
    height: int | None = None
    seed: int | None = None
    steps: int | None = None  # None: the pipeline's default num_inference_steps
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    output_format: str = "png"


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    # bool is an int to Python, never to a client.
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise BadRequest(f"'{name}' must be an integer", name)
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def _text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string", name)
    return value


def parse_size(value: Any) -> tuple[int | None, int | None]:
    """`WxH` -> (W, H); `auto` or absent -> the pipeline's default."""
    if value is None or value == "auto":
        return None, None
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise BadRequest(f"'size' must look like '512x512' (width x height), got {value!r}", "size")
    width, height = int(match[1]), int(match[2])
    for side in (width, height):
        # Latents are 1/8 of the image: diffusion pipelines refuse other sizes.
        if side < 8 or side > MAX_SIDE or side % 8:
            raise BadRequest(
                f"'size' {width}x{height} is not supported: width and height must be "
                f"multiples of 8 between 8 and {MAX_SIDE}",
                "size",
            )
    return width, height


def parse_image_request(body: Any) -> ImageRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("'prompt' is required and must be a non-empty string", "prompt")
    response_format = body.get("response_format") or "b64_json"
    if response_format == "url":
        raise BadRequest(
            "response_format 'url' is not supported: dmr keeps no image files to link to; "
            "use 'b64_json' to get the images inline",
            "response_format",
        )
    if response_format != "b64_json":
        raise BadRequest(
            f"unknown response_format {response_format!r}; use 'b64_json'", "response_format"
        )
    output_format = body.get("output_format") or "png"
    if output_format not in OUTPUT_FORMATS:
        raise BadRequest(
            f"unknown output_format {output_format!r}; use one of {', '.join(OUTPUT_FORMATS)}",
            "output_format",
        )
    width, height = parse_size(body.get("size"))
    steps = _int(body, "steps", 1, MAX_STEPS)
    if steps is None:
        steps = _int(body, "num_inference_steps", 1, MAX_STEPS)
    guidance = body.get("guidance_scale")
    if guidance is not None and (
        isinstance(guidance, bool) or not isinstance(guidance, int | float) or guidance < 0
    ):
        raise BadRequest("'guidance_scale' must be a number of 0 or more", "guidance_scale")
    return ImageRequest(
        prompt=prompt,
        n=_int(body, "n", 1, MAX_IMAGES) or 1,
        width=width,
        height=height,
        seed=_int(body, "seed", 0, MAX_SEED),
        steps=steps,
        negative_prompt=_text(body, "negative_prompt"),
        guidance_scale=float(guidance) if guidance is not None else None,
        output_format=output_format,
    )
