"""How every `dmr` command reports a failure: one line on stderr, `error: ...`, then exit 1.

Exit codes: 0 success, 1 a failure reported here (bad input, the server refused,
the server could not be reached), 2 a usage error (click's own), 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from dmr.cli.http import ServerResponse

__all__ = ["EXIT_FAILURE", "CliError", "error_message", "fail", "report", "warn"]

EXIT_FAILURE = 1


class CliError(Exception):
    """Raised inside a command for `fail` to print: one line for the user, then exit 1."""


def report(message: str) -> None:
    """Say what failed without ending the command (a turn of an interactive chat)."""
    # Plain text, not rich markup: a model name like `[org/model]` must print as typed.
    print(f"error: {message}", file=sys.stderr, flush=True)


def fail(message: str, *, code: int = EXIT_FAILURE) -> NoReturn:
    report(message)
    sys.exit(code)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def error_message(response: ServerResponse) -> str:
    """The server's error text, whatever shape it came in (OpenAI, Ollama, plain, HTML)."""
    text = response.read().decode(errors="replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        if not text or text.startswith("<"):  # an HTML error page: no message for a terminal
            return f"the server answered {response.status_code} {response.reason_phrase}"
        return text
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return text or f"the server answered {response.status_code}"
