"""Error bodies in each dialect's shape, and blueprint handlers that produce them.

Every dialect answers the same failures (`DmrError`, an oversize body, an
unexpected crash) but each client library parses a different JSON shape, so
each blueprint installs handlers rendering through its own `ErrorRenderer`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from dmr.sdk import DmrError, InvalidRequestError, PayloadTooLargeError
from dmr.sdk.dialect import error_json_response, openai_error_body
from quart import Blueprint, Response, current_app
from werkzeug.exceptions import HTTPException

__all__ = [
    "ErrorRenderer",
    "anthropic_error_body",
    "install_error_handlers",
    "ollama_error_body",
    "openai_error_body",
    "to_dmr_error",
]

log = logging.getLogger(__name__)

ErrorRenderer = Callable[[DmrError], dict[str, Any]]


def ollama_error_body(error: DmrError) -> dict[str, Any]:
    return {"error": error.message}


# Anthropic's documented error types, by HTTP status.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_body(error: DmrError) -> dict[str, Any]:
    error_type = _ANTHROPIC_TYPES.get(error.status)
    if error_type is None:
        error_type = "invalid_request_error" if error.status < 500 else "api_error"
    return {"type": "error", "error": {"type": error_type, "message": error.message}}


class _HttpError(DmrError):
    """A werkzeug HTTP exception (405, 415, ...) carried as a `DmrError`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = HTTPStatus(status).phrase.lower().replace(" ", "_")
        self.error_type = "invalid_request_error" if status < 500 else "server_error"


def to_dmr_error(error: BaseException) -> DmrError:
    """Any exception a route can raise, as the `DmrError` whose status clients should see."""
    if isinstance(error, DmrError):
        return error
    if isinstance(error, HTTPException):
        status = error.code or 500
        if status == 413:
            limit = current_app.config.get("MAX_CONTENT_LENGTH")
            return PayloadTooLargeError(f"request body larger than the {limit} byte limit")
        if status == 400:
            return InvalidRequestError(error.description or "bad request")
        return _HttpError(status, error.description or HTTPStatus(status).phrase)
    return DmrError(f"internal error: {type(error).__name__}: {error}")


def render_error(error: BaseException, renderer: ErrorRenderer) -> Response:
    dmr_error = to_dmr_error(error)
    if dmr_error.status >= 500 and not isinstance(error, DmrError):
        log.exception("unexpected error in an API route", exc_info=error)
    return error_json_response(dmr_error, renderer(dmr_error))


def install_error_handlers(blueprint: Blueprint, renderer: ErrorRenderer) -> None:
    """Answer every error raised inside `blueprint`'s routes in the dialect's shape."""

    async def handle(error: Exception) -> Response:
        return render_error(error, renderer)

    blueprint.register_error_handler(DmrError, handle)
    # Quart looks up handlers by status code before by class, app-wide ones
    # included, so the codes the app handles itself are claimed here by code.
    for status in (400, 404, 405, 413, 415):
        blueprint.register_error_handler(status, handle)
    blueprint.register_error_handler(HTTPException, handle)
    blueprint.register_error_handler(Exception, handle)
