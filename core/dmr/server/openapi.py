"""`GET /openapi.json`: an OpenAPI 3.1 description of the routes this server has.

The paths and methods are read from the app's URL map when asked, so the
description can never list a route that does not exist, nor miss one a plugin
added. What the URL map cannot know, the JSON request bodies, comes from the
small table below, keyed by the end of the path; a route it does not know gets
no `requestBody` rather than a guessed one. Each operation carries
`x-dmr-dialect` (`openai`, `ollama` or `anthropic`): the shape its errors take,
which is what clients (and the reliability fuzzer) parse.
"""

from __future__ import annotations

import re
from typing import Any

from quart import Blueprint, Quart, Response, current_app, jsonify

__all__ = ["blueprint", "describe"]

blueprint = Blueprint("dmr_openapi", __name__)

_STRING: dict[str, Any] = {"type": "string"}
_NONEMPTY: dict[str, Any] = {"type": "string", "minLength": 1, "pattern": r"\S"}
_BOOL: dict[str, Any] = {"type": "boolean"}
_NUMBER: dict[str, Any] = {"type": "number"}
_OBJECT: dict[str, Any] = {"type": "object"}
_MESSAGES: dict[str, Any] = {"type": "array", "items": {"type": "object"}}
_CONFIGURE_FIELDS: dict[str, dict[str, Any]] = {
    "context-size": {"type": "integer"},
    "runtime-flags": {"type": "array", "items": _STRING},
    "raw-runtime-flags": _STRING,
    "keep_alive": {},
}


def _body(required: tuple[str, ...], **properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": properties}


# The model-named inference routes check `model` themselves and hand the rest to
# the runner (or translate it), so `model` is all they require.
_MODEL_ONLY = _body(("model",), model=_NONEMPTY, stream=_BOOL)

# Path suffix -> request body schema. Longest suffix wins.
_REQUEST_BODIES: dict[str, dict[str, Any]] = {
    "/chat/completions": _body(
        ("model",), model=_NONEMPTY, messages=_MESSAGES, stream=_BOOL, max_tokens=_NUMBER
    ),
    "/v1/completions": _body(("model",), model=_NONEMPTY, prompt=_STRING, stream=_BOOL),
    "/v1/embeddings": _body(("model",), model=_NONEMPTY, input={}),
    "/rerank": _body(("model",), model=_NONEMPTY, query=_STRING, documents={"type": "array"}),
    "/score": _body(("model",), model=_NONEMPTY),
    "/images/generations": _body(("model",), model=_NONEMPTY, prompt=_STRING),
    "/messages": _body(
        ("model",), model=_NONEMPTY, messages=_MESSAGES, max_tokens=_NUMBER, stream=_BOOL
    ),
    "/messages/count_tokens": _body(("model",), model=_NONEMPTY, messages=_MESSAGES),
    "/responses": _body(("model", "input"), model=_NONEMPTY, input={}, stream=_BOOL),
    "/api/chat": _body(("model",), model=_NONEMPTY, messages=_MESSAGES, stream=_BOOL),
    "/api/generate": _body(("model",), model=_NONEMPTY, prompt=_STRING, stream=_BOOL),
    "/api/embed": _body(("model",), model=_NONEMPTY, input={}),
    "/api/embeddings": _body(("model",), model=_NONEMPTY, prompt=_STRING),
    "/api/show": _body((), model=_STRING, name=_STRING),
    "/api/pull": _body((), model=_STRING, name=_STRING, stream=_BOOL),
    "/api/push": _body((), model=_STRING, name=_STRING, stream=_BOOL),
    "/api/delete": _body((), model=_STRING, name=_STRING),
    "/api/copy": _body(("source", "destination"), source=_NONEMPTY, destination=_NONEMPTY),
    "/api/create": _body((), model=_STRING, name=_STRING, **{"from": _STRING}),
    "/models/create": _body(("from",), **{"from": _NONEMPTY, "bearer-token": _STRING}),
    "/repackage": _body(
        ("target",), target=_NONEMPTY, context_size={"type": "integer", "minimum": 1}
    ),
    "/push": _body((), **{"bearer-token": _STRING}),
    "/engines/unload": _body(
        (),
        all={"type": ["boolean", "null"]},
        backend={"type": ["string", "null"]},
        models={"type": ["array", "null"], "items": _STRING},
    ),
    "/_configure": _body(
        ("model",),
        model=_NONEMPTY,
        mode=_STRING,
        **_CONFIGURE_FIELDS,
    ),
}

# Bodies that are not JSON.
_RAW_BODIES: dict[str, str] = {
    "/models/load": "application/x-tar",
    "/api/blobs/sha256:{digest_hex}": "application/octet-stream",
}

_SKIPPED_ENDPOINTS = frozenset({"static"})  # Quart's default static route; dmr serves none


def _dialect(endpoint: str) -> str:
    blueprint_name = endpoint.split(".", 1)[0]
    if blueprint_name.endswith("ollama"):
        return "ollama"
    if blueprint_name.endswith("anthropic"):
        return "anthropic"
    return "openai"  # the core routes answer errors in OpenAI's shape too


def _openapi_path(rule: str) -> tuple[str, list[str]]:
    """`/models/<path:name>` -> (`/models/{name}`, [`name`])."""
    names: list[str] = []

    def replace(match: re.Match[str]) -> str:
        names.append(match.group(1))
        return "{" + match.group(1) + "}"

    return re.sub(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>", replace, rule), names


def _request_body(path: str, method: str) -> dict[str, Any] | None:
    if method not in ("POST", "PUT", "PATCH", "DELETE"):
        return None
    for suffix, media_type in _RAW_BODIES.items():
        if path.endswith(suffix):
            return {"required": True, "content": {media_type: {"schema": {}}}}
    matches = [suffix for suffix in _REQUEST_BODIES if path.endswith(suffix)]
    if not matches:
        return None
    schema = _REQUEST_BODIES[max(matches, key=len)]
    json_body = {"application/json": {"schema": schema}}
    return {"required": bool(schema["required"]), "content": json_body}


def describe(app: Quart) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint in _SKIPPED_ENDPOINTS:
            continue
        path, names = _openapi_path(rule.rule)
        methods = (rule.methods or set()) - {"OPTIONS"}
        if methods != {"HEAD"}:  # HEAD is implied by GET, unless it is the route's only method
            methods -= {"HEAD"}
        for method in sorted(methods):
            operation: dict[str, Any] = {
                "operationId": f"{rule.endpoint}.{method.lower()}",
                "x-dmr-dialect": _dialect(rule.endpoint),
                "parameters": [
                    {"name": name, "in": "path", "required": True, "schema": _STRING}
                    for name in names
                ],
                "responses": {"default": {"description": "the route's answer or an error"}},
            }
            body = _request_body(path, method)
            if body is not None:
                operation["requestBody"] = body
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "dmr", "version": _version()},
        "paths": dict(sorted(paths.items())),
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dmr")
    except PackageNotFoundError:
        return "0"


@blueprint.get("/openapi.json")
async def openapi_json() -> Response:
    return jsonify(describe(current_app))
