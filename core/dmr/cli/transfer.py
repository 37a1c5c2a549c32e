"""`dmr pull` and `dmr push`: stream the server's NDJSON progress into rich bars.

The server does the transfer; the CLI only shows it. Ctrl-C closes the stream,
the server cancels the transfer and keeps each partial blob (`.incomplete`), so
running the same command again resumes where it stopped.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn
from urllib.parse import quote

import httpx
import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from dmr.cli.client import connect, server_url
from dmr.cli.main import app, console, err_console

__all__ = ["pull", "push"]


def _fail(message: str) -> NoReturn:
    err_console.print(f"[red]Error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _error_message(response: httpx.Response) -> str:
    """The server's error text, whatever shape it came in."""
    text = response.read().decode(errors="replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error)
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return text


class _Bars:
    """One bar per layer, created as the layer's first progress line arrives."""

    def __init__(self, progress: Progress, verb: str) -> None:
        self.progress = progress
        self.verb = verb
        self.tasks: dict[str, TaskID] = {}

    def update(self, layer: dict[str, Any]) -> None:
        layer_id = str(layer.get("id", ""))
        size = int(layer.get("size") or 0)
        current = int(layer.get("current") or 0)
        task = self.tasks.get(layer_id)
        if task is None:
            label = layer_id.removeprefix("sha256:")[:12]
            task = self.progress.add_task(f"{self.verb} {label}", total=size or None)
            self.tasks[layer_id] = task
        self.progress.update(task, completed=current, total=size or None)


def _stream(path: str, body: dict[str, Any], *, verb: str, retry_hint: str) -> None:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    bars = _Bars(progress, verb)
    final: str | None = None
    try:
        with (
            connect(timeout=None) as client,
            client.stream(
                "POST", path, json=body, headers={"Accept": "application/x-ndjson"}
            ) as response,
        ):
            if response.status_code >= 400:
                _fail(_error_message(response))
            with progress:
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    kind = event.get("type")
                    if kind == "error":
                        progress.stop()
                        _fail(str(event.get("message") or "transfer failed"))
                    if kind == "warning":
                        progress.console.print(f"[yellow]Warning:[/yellow] {event.get('message')}")
                    elif kind == "success":
                        final = str(event.get("message") or "")
                    elif isinstance(event.get("layer"), dict):
                        bars.update(event["layer"])
    except httpx.ConnectError as error:
        base, socket = server_url()
        where = f"unix socket {socket}" if socket else base
        _fail(f"cannot reach the dmr server at {where} ({error}); start it with `dmr serve`")
    except httpx.HTTPError as error:
        _fail(f"connection to the dmr server failed: {error}")
    except KeyboardInterrupt:
        err_console.print(f"interrupted: {retry_hint}")
        sys.exit(130)
    if final is None:
        _fail("the server closed the progress stream before the transfer finished")
    console.print(final, highlight=False)


@app.command()
def pull(
    model: str = typer.Argument(..., help="ai/smollm2, registry/org/model:tag or hf.co/org/repo"),
) -> None:
    """Pull a model from an OCI registry or Hugging Face into the store."""
    _stream(
        "/models/create",
        {"from": model},
        verb="Downloading",
        retry_hint=f"run `dmr pull {model}` again to resume",
    )


@app.command()
def push(model: str = typer.Argument(..., help="registry/org/model:tag of a stored model")) -> None:
    """Push a stored model to the registry its name points at."""
    _stream(
        f"/models/{quote(model, safe='/:@')}/push",
        {},
        verb="Uploading",
        retry_hint=f"run `dmr push {model}` again",
    )
