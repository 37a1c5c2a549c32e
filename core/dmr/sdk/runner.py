"""The runner kit: what a runner subprocess written in Python needs (docs/plugins.md,
"The runner kit").

    from dmr.sdk.runner import BadRequest, error_response, json_response, serve_runner

`serve_runner(app, socket_path, load)` serves an ASGI app on the unix socket the
scheduler hands the runner while `load` loads the model in a thread, and stops on
SIGTERM or when the server is gone. Views refuse a bad request with `BadRequest`
(a 400 in OpenAI's error shape) and answer with `json_response` / `error_response`
(`error_bytes` for a raw ASGI answer). `PRIORITY_HEADER` is `BATCH_PRIORITY` on
batch work, which a runner that can tell priorities apart serves after chats;
`LONE_HEADER` is `LONE_VALUE` on a request that reached the server alone, which a
runner that waits for the rest of a burst need not wait for. The
ASGI helpers (`read_body`, `replay`, `send_whole`, `send_streamed`,
`unless_disconnected`, `Receive`, `Send`) serve a streamed generation past the web
framework, as the llama.cpp runner does. `sniff_media_type` names an image by its
bytes (PNG, JPEG, GIF, WebP: `SUPPORTED_MEDIA_TYPES`).

Nothing here imports the server: a runner loads only asyncio, Quart and hypercorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmr.sdk._lazy import lazy_exports

if TYPE_CHECKING:
    from dmr.asgi_streams import (
        Receive,
        Send,
        read_body,
        replay,
        send_streamed,
        send_whole,
        unless_disconnected,
    )
    from dmr.direct_streams import DirectWriter, offer_for
    from dmr.error_bodies import openai_error
    from dmr.image_types import SUPPORTED_FORMATS, SUPPORTED_MEDIA_TYPES, sniff_media_type
    from dmr.runner_support import (
        BATCH_PRIORITY,
        LONE_HEADER,
        LONE_VALUE,
        PRIORITY_HEADER,
        BadRequest,
        error_bytes,
        error_response,
        json_response,
        serve_runner,
        stop_when_orphaned,
    )

__all__ = [
    "BATCH_PRIORITY",
    "LONE_HEADER",
    "LONE_VALUE",
    "PRIORITY_HEADER",
    "SUPPORTED_FORMATS",
    "SUPPORTED_MEDIA_TYPES",
    "BadRequest",
    "DirectWriter",
    "Receive",
    "Send",
    "error_bytes",
    "error_response",
    "json_response",
    "offer_for",
    "openai_error",
    "read_body",
    "replay",
    "send_streamed",
    "send_whole",
    "serve_runner",
    "sniff_media_type",
    "stop_when_orphaned",
    "unless_disconnected",
]

if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, __file__)
