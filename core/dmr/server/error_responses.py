"""A `DmrError` as a JSON response, for the server's handlers and the dialects' alike:
the body in the caller's shape (OpenAI's, Anthropic's, Ollama's), the error's status,
and `Retry-After` when the error says when to come back (503 for a full queue)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Response, jsonify

if TYPE_CHECKING:
    from dmr.errors import DmrError

__all__ = ["error_json_response"]


def error_json_response(error: DmrError, body: dict[str, Any]) -> Response:
    response = jsonify(body)
    response.status_code = error.status
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response
