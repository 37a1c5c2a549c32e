"""The OpenAI Responses dialect, on every prefix Docker Model Runner serves it on:
`/responses`, `/v1/responses`, `/engines/responses`, `/engines/v1/responses` and
`/engines/{backend}/v1/responses` (the last runs the model on that backend).

Each response is answered from the runner's chat completions and kept in
memory for an hour, so `previous_response_id` continues the conversation.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from dmr.errors import InvalidRequestError, ModelNotFoundError
from dmr.hookspecs import hookimpl
from dmr.records import ApiDialect, Mode
from dmr.server.services import get_services
from quart import Blueprint, Response, jsonify, request

from dmr_apis._responses_store import ResponseStore, StoredResponse
from dmr_apis._responses_translate import (
    chat_payload,
    check_supported,
    function_call_item,
    input_items,
    items_to_messages,
    message_item,
    new_id,
    output_items,
    output_messages,
    reasoning_item,
    response_object,
    usage_of,
)
from dmr_apis.common.answer_fold import AnswerFold, fold_answer
from dmr_apis.common.body import optional_bool, read_json_object, require_model
from dmr_apis.common.errors import install_error_handlers, openai_error_body
from dmr_apis.common.model_lookup import check_backend, resolve_model
from dmr_apis.common.runner_calls import call_runner, stream_runner
from dmr_apis.common.streaming import encode_event, stream_response

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


def _finish(
    finish_reason: str | None, calls: list[Any]
) -> tuple[str, str | None]:  # (status, incomplete reason)
    if finish_reason == "length" and not calls:
        return "incomplete", "max_output_tokens"
    return "completed", None


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
        status, reason = _finish(answer.finish_reason, answer.calls)
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

    async def events() -> AsyncIterator[bytes]:
        sequence = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal sequence
            data = {"type": kind, "sequence_number": sequence, **fields}
            sequence += 1
            return encode_event(kind, data)

        pending = response_object(
            body,
            response_id=response_id,
            created_at=created_at,
            status="in_progress",
            output=[],
            usage=None,
        )
        yield event("response.created", response=pending)
        yield event("response.in_progress", response=pending)
        message_id = new_id("msg")
        reasoning_id = new_id("rs")
        answer = AnswerFold()
        output: list[dict[str, Any]] = []
        item_open = False
        reasoning_open = False
        message_index = 0  # after the reasoning item, when there is one

        def open_item() -> list[bytes]:
            """The message item's opening events (sequence numbers taken in order)."""
            added = event(
                "response.output_item.added",
                output_index=message_index,
                item=message_item(message_id, "", status="in_progress"),
            )
            part = event(
                "response.content_part.added",
                item_id=message_id,
                output_index=message_index,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            )
            return [added, part]

        def open_reasoning() -> list[bytes]:
            added = event(
                "response.output_item.added",
                output_index=0,
                item={**reasoning_item(reasoning_id, ""), "content": []},
            )
            part = event(
                "response.content_part.added",
                item_id=reasoning_id,
                output_index=0,
                content_index=0,
                part={"type": "reasoning_text", "text": ""},
            )
            return [added, part]

        def close_reasoning() -> list[bytes]:
            """The reasoning item's closing events; it goes first in `output`."""
            text = answer.reasoning
            item = reasoning_item(reasoning_id, text)
            output.append(item)
            return [
                event(
                    "response.reasoning_text.done",
                    item_id=reasoning_id,
                    output_index=0,
                    content_index=0,
                    text=text,
                ),
                event(
                    "response.content_part.done",
                    item_id=reasoning_id,
                    output_index=0,
                    content_index=0,
                    part={"type": "reasoning_text", "text": text},
                ),
                event("response.output_item.done", output_index=0, item=item),
            ]

        try:
            async for delta in answer.deltas(upstream.events()):
                # Thinking streams as a reasoning item, closed when the answer starts.
                if delta.reasoning and not item_open:
                    if not reasoning_open:
                        reasoning_open = True
                        for opening in open_reasoning():
                            yield opening
                    yield event(
                        "response.reasoning_text.delta",
                        item_id=reasoning_id,
                        output_index=0,
                        content_index=0,
                        delta=delta.reasoning,
                    )
                if not delta.content:
                    continue
                if not item_open:
                    if reasoning_open:
                        for closing in close_reasoning():
                            yield closing
                        message_index = 1
                    item_open = True
                    for opening in open_item():
                        yield opening
                yield event(
                    "response.output_text.delta",
                    item_id=message_id,
                    output_index=message_index,
                    content_index=0,
                    delta=delta.content,
                    logprobs=[],
                )
        except Exception as error:  # the stream broke after the 200 went out
            failed = response_object(
                body,
                response_id=response_id,
                created_at=created_at,
                status="failed",
                output=[],
                usage=None,
            )
            failed["error"] = {"code": "server_error", "message": str(error)}
            yield event("response.failed", response=failed)
            return
        if reasoning_open and not item_open:  # thinking, then no text
            for closing in close_reasoning():
                yield closing
            message_index = 1
        text = answer.content
        finished_calls = answer.calls
        if item_open or not finished_calls:
            if not item_open:
                for opening in open_item():
                    yield opening
            part = {"type": "output_text", "text": text, "annotations": []}
            yield event(
                "response.output_text.done",
                item_id=message_id,
                output_index=message_index,
                content_index=0,
                text=text,
                logprobs=[],
            )
            yield event(
                "response.content_part.done",
                item_id=message_id,
                output_index=message_index,
                content_index=0,
                part=part,
            )
            done_item = message_item(message_id, text)
            yield event("response.output_item.done", output_index=message_index, item=done_item)
            output.append(done_item)
        # Function calls go out whole, once all of their fragments have arrived.
        for call in finished_calls:
            index = len(output)
            item = function_call_item(call)
            added = {**item, "arguments": "", "status": "in_progress"}
            yield event("response.output_item.added", output_index=index, item=added)
            yield event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=index,
                delta=call.arguments,
            )
            yield event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=call.arguments,
            )
            yield event("response.output_item.done", output_index=index, item=item)
            output.append(item)
        status, reason = _finish(answer.finish_reason, finished_calls)
        final = response_object(
            body,
            response_id=response_id,
            created_at=created_at,
            status=status,
            output=output,
            usage=usage_of(answer.usage),
            incomplete_reason=reason,
        )
        remember(final)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        yield event(kind, response=final)

    return stream_response(events(), "text/event-stream", on_close=upstream.aclose)


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
