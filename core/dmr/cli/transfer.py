"""`dmr pull` and `dmr push`: stream the server's NDJSON progress into rich bars.

The server does the transfer; the CLI only shows it. Ctrl-C closes the stream,
the server cancels the transfer and keeps each partial blob (`.incomplete`), so
running the same command again resumes where it stopped.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import click

from dmr.cli.client import connect
from dmr.cli.errors import error_message, fail
from dmr.cli.http import HTTPError, TransportError, ndjson_events
from dmr.cli.main import console

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = ["pull", "push", "push_model"]


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


def _progress_bars() -> Progress:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


def _stream(path: str, body: dict[str, Any], *, verb: str, retry_hint: str) -> None:
    final: str | None = None
    try:
        with (
            connect(timeout=None) as client,
            client.stream(
                "POST", path, json=body, headers={"Accept": "application/x-ndjson"}
            ) as response,
        ):
            if response.status_code >= 400:
                fail(error_message(response))
            # Built only now: importing rich takes about 45 ms, which the server spends
            # on the transfer instead of waiting for the request (docs/benchmarks.md).
            progress = _progress_bars()
            bars = _Bars(progress, verb)
            with progress:
                for event in ndjson_events(response.iter_lines()):
                    kind = event.get("type")
                    if kind == "error":
                        progress.stop()
                        fail(str(event.get("message") or "transfer failed"))
                    if kind == "warning":
                        progress.console.print(f"warning: {event.get('message')}", markup=False)
                    elif kind == "success":
                        final = str(event.get("message") or "")
                    elif isinstance(event.get("layer"), dict):
                        bars.update(event["layer"])
    except TransportError as error:
        fail(str(error))
    except HTTPError as error:
        fail(f"connection to the dmr server failed: {error}")
    except KeyboardInterrupt:
        print(f"interrupted: {retry_hint}", file=sys.stderr)
        sys.exit(130)
    if final is None:
        fail("the server closed the progress stream before the transfer finished")
    console.print(final, highlight=False)


@click.command()
@click.argument("model")
def pull(model: str) -> None:
    """Pull MODEL (ai/smollm2, registry/org/model:tag or hf.co/org/repo) into the store."""
    _stream(
        "/models/create",
        {"from": model},
        verb="Downloading",
        retry_hint=f"run `dmr pull {model}` again to resume",
    )


@click.command()
@click.argument("model")
def push(model: str) -> None:
    """Push a stored MODEL (registry/org/model:tag) to the registry its name points at."""
    push_model(model)


def push_model(model: str) -> None:
    _stream(
        f"/models/{quote(model, safe='/:@')}/push",
        {},
        verb="Uploading",
        retry_hint=f"run `dmr push {model}` again",
    )
