"""The OpenAI Responses dialect, on every prefix Docker Model Runner serves it on:
`/responses`, `/v1/responses`, `/engines/responses`, `/engines/v1/responses` and
`/engines/{backend}/v1/responses` (the last runs the model on that backend).

Each response is answered from the runner's chat completions and kept in
memory for an hour, so `previous_response_id` continues the conversation.
"""

from __future__ import annotations

import time
from typing import Any

from dmr.sdk import ApiDialect, InvalidRequestError, Mode, ModelNotFoundError, hookimpl
from dmr.sdk.dialect import call_runner, get_services, stream_runner
from quart import Blueprint, Response, jsonify, request

from dmr_apis.common.answer_fold import fold_answer
from dmr_apis.common.body import optional_bool, read_json_object, require_model
from dmr_apis.common.errors import install_error_handlers, openai_error_body
from dmr_apis.common.model_lookup import check_backend, resolve_model
from dmr_apis.common.streaming import stream_response
from dmr_apis.responses.store import ResponseStore, StoredResponse
from dmr_apis.responses.stream import ResponseStream, finish_status
from dmr_apis.responses.translate import (
    chat_payload,
    check_supported,
    input_items,
    items_to_messages,
    new_id,
    output_items,
    output_messages,
    response_object,
    usage_of,
)

__all__ = ["blueprint", "dmr_api_dialects"]

blueprint = Blueprint("dmr_apis_responses", __name__)
install_error_handlers(blueprint, openai_error_body)

# Docker Model Runner's pkg/responses registers these (docs/compatibility.md §4).
_PREFIXES = (
    "/v1/responses",
    "/responses",
    "/engines/responses",
    "/engines/v1/responses",
    "/engines/<backend>/v1/responses",
)


def response_store() -> ResponseStore:
    extras = get_services().extras
    store = extras.get("responses")
    if not isinstance(store, ResponseStore):
        store = extras["responses"] = ResponseStore()
    return store


def _stored(response_id: str) -> StoredResponse:
    stored = response_store().get(response_id)
    if stored is None:
        raise ModelNotFoundError(f"response {response_id!r} not found (responses last one hour)")
    return stored


async def create(backend: str | None = None) -> Response:
    check_backend(backend)
    _, body = await read_json_object()
    name, _ = resolve_model(require_model(body))
    check_supported(body)
    stream = bool(optional_bool(body, "stream"))
    if body.get("input") is None:
        raise InvalidRequestError("missing required field 'input'")
    items = input_items(body["input"])
    history: list[dict[str, Any]] = []
    previous_id = body.get("previous_response_id")
    if previous_id is not None:
        if not isinstance(previous_id, str):
            raise InvalidRequestError("'previous_response_id' must be a string")
        history = list(_stored(previous_id).conversation)
    conversation = history + items_to_messages(items)
    payload = chat_payload(body, conversation, stream=stream)
    response_id = new_id("resp")
    created_at = int(time.time())
    keep = body.get("store", True) is not False
    # Taken now: a streamed body is sent outside the app context.
    store = response_store()

    def remember(response: dict[str, Any]) -> None:
        if keep:
            store.put(
                response_id,
                StoredResponse(
                    response=response,
                    input_items=items,
                    conversation=conversation + output_messages(response["output"]),
                ),
            )

    if not stream:
        result = await call_runner(
            name, Mode.COMPLETION, "/v1/chat/completions", payload, backend=backend
        )
        answer = fold_answer(result.body)
        status, reason = finish_status(answer.finish_reason, answer.calls)
        response = response_object(
            body,
            response_id=response_id,
            created_at=created_at,
            status=status,
            output=output_items(answer.content, answer.calls, reasoning=answer.reasoning),
            usage=usage_of(answer.usage),
            incomplete_reason=reason,
        )
        remember(response)
        return jsonify(response)

    upstream = await stream_runner(
        name, Mode.COMPLETION, "/v1/chat/completions", payload, backend=backend
    )
    writer = ResponseStream(body, response_id=response_id, created_at=created_at, remember=remember)
    return stream_response(
        writer.events(upstream.events()), "text/event-stream", on_close=upstream.aclose
    )


async def get_response(response_id: str, backend: str | None = None) -> Response:
    check_backend(backend)
    return jsonify(_stored(response_id).response)


async def delete_response(response_id: str, backend: str | None = None) -> Response:
    check_backend(backend)
    if not response_store().delete(response_id):
        raise ModelNotFoundError(f"response {response_id!r} not found")
    return jsonify({"id": response_id, "object": "response", "deleted": True})


async def list_input_items(response_id: str, backend: str | None = None) -> Response:
    check_backend(backend)
    items = list(_stored(response_id).input_items)
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("'order' must be asc or desc")
    if order == "desc":
        items.reverse()
    after = request.args.get("after")
    if after:
        ids = [item.get("id") for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    try:
        limit = int(request.args.get("limit", "20"))
    except ValueError:
        raise InvalidRequestError("'limit' must be an integer") from None
    limit = min(max(limit, 1), 100)
    page = items[:limit]
    return jsonify(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )


for _prefix in _PREFIXES:
    _key = _prefix.strip("/").replace("<backend>", "backend").replace("/", "_")
    blueprint.add_url_rule(_prefix, f"create_{_key}", create, methods=["POST"])
    blueprint.add_url_rule(f"{_prefix}/<response_id>", f"get_{_key}", get_response, methods=["GET"])
    blueprint.add_url_rule(
        f"{_prefix}/<response_id>", f"delete_{_key}", delete_response, methods=["DELETE"]
    )
    blueprint.add_url_rule(
        f"{_prefix}/<response_id>/input_items",
        f"input_items_{_key}",
        list_input_items,
        methods=["GET"],
    )


@hookimpl
def dmr_api_dialects() -> list[ApiDialect]:
    return [ApiDialect(name="responses", blueprint=blueprint)]
