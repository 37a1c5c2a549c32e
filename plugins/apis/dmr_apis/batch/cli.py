"""`dmr batch create|ls|inspect|cancel|results`: the Batch API from the command line.

A plugin command (the `dmr.cli` entry point group): it talks to the server over
the same connection as every other command, through its Files and Batch routes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from dmr.sdk.dialect import HTTPError, ServerClient, ServerResponse, connect, error_message, fail

__all__ = ["batch"]

ENDED = {"completed", "failed", "expired", "cancelled"}


@contextmanager
def _server() -> Iterator[ServerClient]:
    try:
        with connect() as client:
            yield client
    except HTTPError as error:
        fail(str(error))


def _checked(response: ServerResponse) -> Any:
    if response.status_code >= 400:
        fail(error_message(response))
    return response.json()


@click.group()
def batch() -> None:
    """Run a JSONL file of requests as an OpenAI batch (docs/batch.md)."""


@batch.command("create")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--endpoint", help="Default: the url of the file's first line.")
@click.option("--completion-window", default="24h", show_default=True)
@click.option("--metadata", multiple=True, metavar="KEY=VALUE")
@click.option("--no-wait", is_flag=True, help="Print the batch ID and return at once.")
def create(
    file: Path, endpoint: str | None, completion_window: str, metadata: tuple[str, ...],
    no_wait: bool,
) -> None:  # fmt: skip
    """Upload FILE and run it as a batch, with a live progress bar."""
    import httpx

    data = file.read_bytes()
    endpoint = endpoint or _first_url(data)
    tags = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--metadata takes KEY=VALUE, not {item!r}")
        tags[key] = value
    # httpx encodes the multipart body; the CLI's own client sends it.
    encoded = httpx.Request(
        "POST", "http://dmr/v1/files", data={"purpose": "batch"}, files={"file": (file.name, data)}
    )
    with _server() as client:
        uploaded = _checked(
            client.post(
                "/v1/files",
                content=encoded.read(),
                headers={"Content-Type": encoded.headers["Content-Type"]},
            )
        )
        body = {
            "input_file_id": uploaded["id"],
            "endpoint": endpoint,
            "completion_window": completion_window,
            "metadata": tags or None,
        }
        created = _checked(client.post("/v1/batches", json=body))
        if no_wait:
            click.echo(created["id"])
            return
        final = _follow(client, created["id"])
    _summary(final)
    if final["status"] != "completed":
        sys.exit(1)


def _first_url(data: bytes) -> str:
    for raw in data.splitlines():
        if raw.strip():
            try:
                url = json.loads(raw).get("url")
            except (ValueError, AttributeError):
                break
            if isinstance(url, str):
                return url
            break
    fail("the file's first line names no url: pass --endpoint")


def _follow(client: ServerClient, batch_id: str) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    ) as progress:
        task = progress.add_task(batch_id, total=None)
        while True:
            current = _checked(client.get(f"/v1/batches/{batch_id}"))
            counts = current["request_counts"]
            done = counts["completed"] + counts["failed"]
            progress.update(
                task,
                total=counts["total"] or None,
                completed=done,
                description=f"{batch_id} {current['status']}",
            )
            if current["status"] in ENDED:
                return dict(current)
            time.sleep(0.5)


def _summary(current: dict[str, Any]) -> None:
    counts = current["request_counts"]
    click.echo(
        f"{current['id']}: {current['status']}, {counts['completed']} completed, "
        f"{counts['failed']} failed of {counts['total']}"
    )
    for error in (current.get("errors") or {}).get("data") or []:
        click.echo(f"  {error.get('code')}: {error.get('message')}")
    if current.get("output_file_id") or current.get("error_file_id"):
        click.echo(f"results: dmr batch results {current['id']}")


@batch.command("ls")
@click.option("--json", "as_json", is_flag=True)
def list_batches(as_json: bool) -> None:
    """List batches, newest first."""
    with _server() as client:
        page = _checked(client.get("/v1/batches", params={"limit": "100"}))
    if as_json:
        click.echo(json.dumps(page["data"], indent=2))
        return
    rows = [("BATCH ID", "STATUS", "ENDPOINT", "DONE", "FAILED", "TOTAL", "CREATED")]
    for item in page["data"]:
        counts = item["request_counts"]
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item["created_at"]))
        rows.append((item["id"], item["status"], item["endpoint"], str(counts["completed"]),
                     str(counts["failed"]), str(counts["total"]), created))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


@batch.command("inspect")
@click.argument("batch_id")
def inspect(batch_id: str) -> None:
    """Print a batch object as JSON."""
    with _server() as client:
        click.echo(json.dumps(_checked(client.get(f"/v1/batches/{batch_id}")), indent=2))


@batch.command("cancel")
@click.argument("batch_id")
def cancel(batch_id: str) -> None:
    """Cancel a running batch; what finished is kept."""
    with _server() as client:
        current = _checked(client.post(f"/v1/batches/{batch_id}/cancel"))
    click.echo(f"{current['id']}: {current['status']}")


@batch.command("results")
@click.argument("batch_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file instead of standard output.")  # fmt: skip
@click.option("--errors", is_flag=True, help="The error file instead of the output file.")
def results(batch_id: str, output: Path | None, errors: bool) -> None:
    """Write a batch's output (or error) lines."""
    kind = "error_file_id" if errors else "output_file_id"
    with _server() as client:
        current = _checked(client.get(f"/v1/batches/{batch_id}"))
        file_id = current.get(kind)
        if not file_id:
            what = "error" if errors else "output"
            fail(f"{batch_id} has no {what} file (status {current['status']})")
        response = client.get(f"/v1/files/{file_id}/content")
        if response.status_code >= 400:
            fail(error_message(response))
        content = response.content
    if output is None:
        sys.stdout.buffer.write(content)
    else:
        output.write_bytes(content)
        click.echo(f"wrote {len(content.splitlines())} lines to {output}")
