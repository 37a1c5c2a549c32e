"""Reading and checking request bodies: enough to route, never more."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, overload

from dmr.sdk import InvalidRequestError
from quart import request

__all__ = [
    "optional_bool",
    "optional_list",
    "optional_number",
    "optional_object",
    "optional_string",
    "parse_json_object",
    "read_json_object",
    "require_model",
]


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequestError(f"request body is not valid JSON: {error}") from None
    except RecursionError:
        # `[[[[...` a few thousand deep fits well under the body cap.
        raise InvalidRequestError("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequestError(f"request body must be a JSON object, not {type(body).__name__}")
    return body


async def read_json_object() -> tuple[bytes, dict[str, Any]]:
    """The raw body (for proxying unchanged) and its parsed JSON object.

    Reading the body enforces the app's MAX_CONTENT_LENGTH (413).
    """
    raw = await request.get_data(cache=True, as_text=False)
    data = raw if isinstance(raw, bytes) else raw.encode()
    return data, parse_json_object(data)


def require_model(body: Mapping[str, Any], field: str = "model") -> str:
    model = body.get(field)
    if model is None:
        raise InvalidRequestError(f"missing required field '{field}'")
    if not isinstance(model, str):
        raise InvalidRequestError(f"'{field}' must be a string, not {type(model).__name__}")
    if not model.strip():
        raise InvalidRequestError(f"'{field}' must not be empty")
    return model.strip()


def _wrong_type(field: str, expected: str, value: Any) -> InvalidRequestError:
    return InvalidRequestError(f"'{field}' must be {expected}, not {type(value).__name__}")


def optional_string(body: Mapping[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise _wrong_type(field, "a string", value)
    return value


def optional_bool(body: Mapping[str, Any], field: str) -> bool | None:
    value = body.get(field)
    if value is not None and not isinstance(value, bool):
        raise _wrong_type(field, "a boolean", value)
    return value


@overload
def optional_number(
    body: Mapping[str, Any], field: str, *, integer: Literal[True]
) -> int | None: ...


@overload
def optional_number(
    body: Mapping[str, Any], field: str, *, integer: bool = False
) -> float | int | None: ...


def optional_number(
    body: Mapping[str, Any], field: str, *, integer: bool = False
) -> float | int | None:
    """`field`'s number (with `integer`, an integer), or None when absent. JSON's
    true and false are no numbers, though Python's bool is an int."""
    value = body.get(field)
    kinds = int if integer else int | float
    if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
        raise _wrong_type(field, "an integer" if integer else "a number", value)
    return value


def optional_list(body: Mapping[str, Any], field: str) -> list[Any] | None:
    value = body.get(field)
    if value is not None and not isinstance(value, list):
        raise _wrong_type(field, "an array", value)
    return value


def optional_object(body: Mapping[str, Any], field: str) -> dict[str, Any] | None:
    value = body.get(field)
    if value is not None and not isinstance(value, dict):
        raise _wrong_type(field, "an object", value)
    return value
