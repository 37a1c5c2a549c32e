"""Observability commands: `logs` and `requests` (docs/compatibility.md §8)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Annotated

import httpx
import typer

from dmr.cli.client import connect
from dmr.cli.main import app
from dmr.cli.runners import fail

__all__: list[str] = []


def _error(response: httpx.Response) -> str:
    try:
        body = json.loads(response.read() or b"{}")
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"server answered {response.status_code}"
    return str(message)


def _stream(
    path: str, params: dict[str, str], headers: dict[str, str] | None = None
) -> Iterator[str]:
    """The server's answer to `path`, read as it comes (no read timeout: follow waits)."""
    try:
        with (
            connect(timeout=None) as client,
            client.stream("GET", path, params=params, headers=headers) as response,
        ):
            if response.status_code >= 400:
                fail(_error(response))
            yield from response.iter_lines()
    except httpx.ConnectError:
        fail("cannot reach the dmr server: is `dmr serve` running? (MODEL_RUNNER_HOST)")
    except httpx.HTTPError as error:
        fail(f"talking to the dmr server failed: {error}")


@app.command()
def logs(
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="Keep printing new lines.")
    ] = False,
    no_engines: Annotated[
        bool, typer.Option("--no-engines", help="Only the server's log, not the runners'.")
    ] = False,
) -> None:
    """Show the server's and the runners' logs, merged by time."""
    params = {"follow": str(follow).lower(), "no-engines": str(no_engines).lower()}
    for line in _stream("/logs", params):
        typer.echo(line)
        sys.stdout.flush()


@app.command()
def requests(
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="Keep printing requests as they end.")
    ] = False,
    model: Annotated[str | None, typer.Option("--model", help="Only this model's.")] = None,
) -> None:
    """Show the last requests and responses per model (JSON, one per line with -f)."""
    params = {"model": model} if model else {}
    if not follow:
        lines = list(_stream("/engines/requests", params))
        typer.echo(json.dumps(json.loads("".join(lines) or "[]"), indent=2))
        return
    for line in _stream("/engines/requests", params, {"Accept": "text/event-stream"}):
        if line.startswith("data:"):
            typer.echo(line[5:].strip())
            sys.stdout.flush()
