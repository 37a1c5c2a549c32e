"""Observability commands: `logs` and `requests` (docs/compatibility.md §8)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import click

from dmr.cli.client import connect
from dmr.cli.errors import error_message, fail
from dmr.cli.http import HTTPError, TransportError

__all__ = ["logs", "requests"]


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
                fail(error_message(response))
            yield from response.iter_lines()
    except TransportError as error:
        fail(str(error))
    except HTTPError as error:
        fail(f"talking to the dmr server failed: {error}")


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("--no-engines", is_flag=True, help="Only the server's log, not the runners'.")
def logs(follow: bool, no_engines: bool) -> None:
    """Show the server's and the runners' logs, merged by time."""
    params = {"follow": str(follow).lower(), "no-engines": str(no_engines).lower()}
    for line in _stream("/logs", params):
        click.echo(line)
        sys.stdout.flush()


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing requests as they end.")
@click.option(
    "--include-existing",
    is_flag=True,
    help="With --follow: print the recorded requests first, then the new ones.",
)
@click.option("--model", help="Only this model's.")
def requests(follow: bool, include_existing: bool, model: str | None) -> None:
    """Show the last requests and responses per model (JSON, one per line with -f)."""
    if include_existing and not follow:
        fail("--include-existing can only be used with --follow")  # as docker model says
    params = {"model": model} if model else {}
    if not follow:
        lines = list(_stream("/engines/requests", params))
        click.echo(json.dumps(json.loads("".join(lines) or "[]"), indent=2))
        return
    if include_existing:
        params["include_existing"] = "true"
    for line in _stream("/engines/requests", params, {"Accept": "text/event-stream"}):
        if line.startswith("data:"):
            click.echo(line[5:].strip())
            sys.stdout.flush()
