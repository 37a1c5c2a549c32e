"""Request checking: every bad input is a clear 400 before the pipeline runs."""

from __future__ import annotations

from typing import Any

import pytest
from dmr_diffusers.runner.requests import BadRequest, ImageRequest, parse_image_request

pytestmark = pytest.mark.diffusers


def test_full_request_is_parsed() -> None:
    parsed = parse_image_request(
        {
            "model": "ai/tiny-sd",
            "prompt": "a red square",
            "n": 2,
            "size": "64x128",
            "seed": 7,
            "steps": 4,
            "negative_prompt": "blue",
            "guidance_scale": 5,
            "response_format": "b64_json",
            "quality": "standard",  # OpenAI fields a pipeline has no use for are ignored
        }
    )
    assert parsed == ImageRequest(
        prompt="a red square",
        n=2,
        width=64,
        height=128,
        seed=7,
        steps=4,
        negative_prompt="blue",
        guidance_scale=5.0,
    )


def test_defaults_leave_the_pipeline_its_own() -> None:
    assert parse_image_request({"prompt": "x"}) == ImageRequest(prompt="x")
    assert parse_image_request({"prompt": "x", "size": "auto"}).width is None
    assert parse_image_request({"prompt": "x", "num_inference_steps": 3}).steps == 3


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ([], None, "JSON object"),
        ({}, "prompt", "'prompt' is required"),
        ({"prompt": "   "}, "prompt", "'prompt' is required"),
        ({"prompt": 3}, "prompt", "'prompt' is required"),
        ({"prompt": "x", "size": "big"}, "size", "'size' must look like '512x512'"),
        ({"prompt": "x", "size": "63x64"}, "size", "multiples of 8"),
        ({"prompt": "x", "size": "0x0"}, "size", "multiples of 8"),
        ({"prompt": "x", "size": "8192x8192"}, "size", "multiples of 8 between 8 and 4096"),
        ({"prompt": "x", "size": 512}, "size", "'size' must look like"),
        ({"prompt": "x", "n": 0}, "n", "'n' must be between 1 and 10"),
        ({"prompt": "x", "n": 11}, "n", "'n' must be between 1 and 10"),
        ({"prompt": "x", "n": "2"}, "n", "'n' must be an integer"),
        ({"prompt": "x", "n": True}, "n", "'n' must be an integer"),
        ({"prompt": "x", "steps": 0}, "steps", "'steps' must be between 1"),
        ({"prompt": "x", "steps": 2.5}, "steps", "'steps' must be an integer"),
        ({"prompt": "x", "seed": -1}, "seed", "'seed' must be between 0"),
        ({"prompt": "x", "negative_prompt": 1}, "negative_prompt", "must be a string"),
        ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale", "must be a number"),
        ({"prompt": "x", "response_format": "url"}, "response_format", "'url' is not supported"),
        ({"prompt": "x", "response_format": "gif"}, "response_format", "unknown response_format"),
        ({"prompt": "x", "output_format": "gif"}, "output_format", "unknown output_format"),
    ],
)
def test_bad_requests_are_refused_clearly(body: Any, param: str | None, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as caught:
        parse_image_request(body)
    assert caught.value.param == param
