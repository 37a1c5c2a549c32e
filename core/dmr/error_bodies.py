"""OpenAI's error body, the one JSON shape the server and every runner answer failures in.

The OpenAI SDK, DMR's CLI and the server's proxy all parse this shape, so it is
built in one place. Light on purpose: runners import it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dmr.errors import DmrError

__all__ = ["openai_error", "openai_error_body"]


def openai_error(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """`{"error": {...}}` as OpenAI writes it; `param` names the offending field."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def openai_error_body(error: DmrError) -> dict[str, Any]:
    """A `DmrError` as the OpenAI-shaped body clients of the server read."""
    return openai_error(error.message, error.error_type, code=error.code)
