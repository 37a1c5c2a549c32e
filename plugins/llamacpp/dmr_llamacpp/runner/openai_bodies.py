"""The JSON the generation routes answer with: OpenAI's shapes plus llama-server's extras
(`timings`, `stopping_word`), whole or as SSE events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from dmr_llamacpp.runner.batching import Finished, TokenLogprob

__all__ = [
    "DONE_EVENT",
    "answer_base",
    "content_chunk_encoder",
    "end_fields",
    "logprobs_chat",
    "logprobs_completion",
    "sse",
    "sse_error",
    "usage",
    "whole_body",
]

DONE_EVENT = b"data: [DONE]\n\n"


def answer_base(id_prefix: str, model_name: str) -> dict[str, Any]:
    """The fields every body and chunk of one answer starts with."""
    return {
        "id": f"{id_prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": model_name,
        "system_fingerprint": "dmr-llamacpp",
    }


def logprobs_chat(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": entry.token,
                "logprob": entry.logprob,
                "bytes": entry.bytes,
                "top_logprobs": [
                    {"token": token, "logprob": logprob, "bytes": data}
                    for token, logprob, data in entry.top
                ],
            }
            for entry in entries
        ]
    }


def logprobs_completion(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [{token: logprob for token, logprob, _ in entry.top} for entry in entries],
        "text_offset": offsets,
    }


def _timings(done: Finished) -> dict[str, float]:
    """llama-server's `timings`: `prompt_n` counts the prompt tokens decoded, `cache_n`
    those reused from the slot's cache."""
    decoded = done.prompt_tokens - done.cached_tokens
    return {
        "cache_n": done.cached_tokens,
        "prompt_n": decoded,
        "prompt_ms": done.prompt_ms,
        "prompt_per_token_ms": done.prompt_ms / max(1, decoded),
        "prompt_per_second": decoded / (done.prompt_ms / 1000) if done.prompt_ms else 0.0,
        "predicted_n": done.completion_tokens,
        "predicted_ms": done.predicted_ms,
        "predicted_per_token_ms": done.predicted_ms / max(1, done.completion_tokens),
        "predicted_per_second": (
            done.completion_tokens / (done.predicted_ms / 1000) if done.predicted_ms else 0.0
        ),
    }


def end_fields(done: Finished) -> dict[str, Any]:
    """llama-server's fields on a whole answer and on a stream's last choice chunk."""
    return {"timings": _timings(done), "stopping_word": done.stop_word or ""}


def usage(done: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def whole_body(
    base: dict[str, Any], kind: str, choice: dict[str, Any], done: Finished
) -> dict[str, Any]:
    """A non-streamed answer (`kind` is `chat.completion` or `text_completion`)."""
    return {**base, "object": kind, "choices": [choice], "usage": usage(done), **end_fields(done)}


def sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def sse_error(message: str) -> bytes:
    """The event that ends a stream whose generation failed (OpenAI's error shape)."""
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


def content_chunk_encoder(chunk_base: dict[str, Any]) -> Callable[[str], bytes]:
    """`text -> SSE event` for the common chunk (content only, no logprobs): the JSON
    around the text is encoded once per stream, not once per token."""
    marker = f"dmr-content-{uuid.uuid4().hex}"
    template = sse(
        {
            **chunk_base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": marker},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
    )
    head, tail = template.split(json.dumps(marker).encode(), 1)

    def encode(text: str) -> bytes:
        return head + json.dumps(text, ensure_ascii=False).encode() + tail

    return encode
