"""A batch's input lines, checked one by one, and the output and error lines it writes.

The shapes are OpenAI's (docs/batch.md): input `{custom_id, method, url, body}`,
output and error `{id, custom_id, response: {status_code, request_id, body}, error}`.
A bad line becomes an error line naming it; the other lines go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ENDPOINTS",
    "BatchLine",
    "LineProblem",
    "error_line",
    "output_line",
    "parse_input",
    "request_id",
]

# The endpoints a batch may target (`endpoint`, and every line's `url`).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


@dataclass(frozen=True)
class BatchLine:
    number: int  # 1-based line number in the input file
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class LineProblem:
    number: int
    custom_id: str | None
    code: str
    message: str


def request_id(batch_id: str, number: int) -> str:
    """The output line's `id`: fixed per input line, so a resumed batch knows what it
    has already written."""
    return f"batch_req_{batch_id.removeprefix('batch_')}_{number}"


def parse_input(data: bytes, endpoint: str) -> tuple[list[BatchLine], list[LineProblem]]:
    lines: list[BatchLine] = []
    problems: list[LineProblem] = []
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        checked = _check_line(number, raw, endpoint)
        if isinstance(checked, LineProblem):
            problems.append(checked)
            continue
        if checked.custom_id in first_seen:
            problems.append(
                LineProblem(
                    number,
                    checked.custom_id,
                    "duplicate_custom_id",
                    f"line {number}: custom_id {checked.custom_id!r} is already used on line "
                    f"{first_seen[checked.custom_id]}",
                )
            )
            continue
        first_seen[checked.custom_id] = number
        lines.append(checked)
    return lines, problems


def _check_line(number: int, raw: bytes, endpoint: str) -> BatchLine | LineProblem:
    try:
        line = json.loads(raw)
    except (ValueError, RecursionError):
        return LineProblem(number, None, "invalid_json", f"line {number} is not valid JSON")
    if not isinstance(line, dict):
        return LineProblem(number, None, "invalid_json", f"line {number} is not a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineProblem(
            number, None, "missing_custom_id", f"line {number} has no string 'custom_id'"
        )
    if line.get("method", "POST") != "POST":
        return LineProblem(
            number,
            custom_id,
            "invalid_method",
            f"line {number}: method must be POST, not {line.get('method')!r}",
        )
    url = line.get("url")
    if url not in ENDPOINTS:
        return LineProblem(
            number,
            custom_id,
            "invalid_url",
            f"line {number}: url {url!r} is not one of {', '.join(ENDPOINTS)}",
        )
    if url != endpoint:
        return LineProblem(
            number,
            custom_id,
            "mismatched_url",
            f"line {number}: url {url!r} differs from the batch's endpoint {endpoint!r}",
        )
    body = line.get("body")
    if not isinstance(body, dict):
        return LineProblem(
            number, custom_id, "invalid_body", f"line {number}: 'body' must be a JSON object"
        )
    if not isinstance(body.get("model"), str) or not body["model"].strip():
        return LineProblem(
            number, custom_id, "missing_model", f"line {number}: 'body' names no 'model'"
        )
    return BatchLine(number, custom_id, body)


def output_line(
    batch_id: str, number: int, custom_id: str, status: int, body: Any
) -> dict[str, Any]:
    """A request the endpoint answered: the output file when 2xx, else the error file."""
    rid = request_id(batch_id, number)
    return {
        "id": rid,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": rid, "body": body},
        "error": None,
    }


def error_line(
    batch_id: str, number: int, custom_id: str | None, code: str, message: str
) -> dict[str, Any]:
    """A line that was never answered: refused before sending, or its batch expired."""
    return {
        "id": request_id(batch_id, number),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
