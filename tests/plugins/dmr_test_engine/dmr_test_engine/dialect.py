"""A third-party API dialect written from the dialect kit alone (docs/plugins.md, "The
dialect kit"), registered through `dmr_api_dialects` as the bundled dialects are.

`POST /test-dialect/echo` with `{"model": NAME, "prompt": TEXT}` asks the model's
runner for a chat answer and returns `{"model": NAME, "id": MODEL_ID, "reply":
TEXT}`. With `"stream": true` the reply comes as NDJSON lines `{"text": PIECE}` and a
last `{"done": true}`, or `{"error": MESSAGE}` when the runner fails half-way.
Errors before the answer (a bad body, no such model, a runner that fails to load)
are the server's JSON errors with their status.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from dmr.sdk import ApiDialect, DmrError, InvalidRequestError, Mode, hookimpl
from dmr.sdk.dialect import (
    RunnerStream,
    call_runner,
    get_services,
    resolve_model,
    stream_runner,
)
from quart import Blueprint, Response, jsonify, request

__all__ = ["blueprint", "dmr_api_dialects"]

blueprint = Blueprint("test_dialect", __name__, url_prefix="/test-dialect")
CHAT = "/v1/chat/completions"


@blueprint.post("/echo")
async def echo() -> Response:
    body = await request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise InvalidRequestError("the body must be a JSON object naming a 'model'")
    # The name to hand the scheduler, and the stored model (404 if there is none).
    name, model = resolve_model(get_services().store, body["model"])
    prompt = str(body.get("prompt", ""))
    payload: dict[str, Any] = {"model": name, "messages": [{"role": "user", "content": prompt}]}
    if not body.get("stream"):
        answer = await call_runner(name, Mode.COMPLETION, CHAT, payload)
        reply = answer.body["choices"][0]["message"]["content"]
        return jsonify({"model": name, "id": model.id, "reply": reply})
    # The runner's status comes first: a failed load is still a proper error answer.
    stream = await stream_runner(name, Mode.COMPLETION, CHAT, {**payload, "stream": True})
    response = Response(_lines(stream), mimetype="application/x-ndjson")
    response.timeout = None  # a generation may outlast Quart's response timeout
    return response


async def _lines(stream: RunnerStream) -> AsyncIterator[bytes]:
    try:
        async for event in stream.events():
            for choice in event.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield _line({"text": text})
        yield _line({"done": True})
    except DmrError as error:  # the runner broke half-way: the status is sent already
        yield _line({"error": error.message})
    finally:
        await stream.aclose()


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"


@hookimpl
def dmr_api_dialects() -> Sequence[ApiDialect]:
    return [ApiDialect(name="test-dialect", blueprint=blueprint)]
