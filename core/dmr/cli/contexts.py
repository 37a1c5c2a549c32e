"""Named Model Runner contexts: `dmr context create|use|ls|rm|inspect`.

Stored where Docker Model Runner's CLI keeps them (cmd/cli/pkg/modelctx), in the
same file and shape, so `docker model context` and `dmr context` share them:
`$DOCKER_CONFIG/model/contexts.json` (default `~/.docker/model/`):

    {"version": 1, "current": "lab",
     "contexts": {"lab": {"host": "http://192.168.1.10:12434",
                          "tls": {"enabled": false, "skipVerify": false, "caCert": ""},
                          "description": "...", "createdAt": "<RFC 3339>"}}}

changed under the lock file `contexts.lock` beside it and replaced whole. The
active context is where every command sends its requests (dmr.cli.autostart),
after `MODEL_RUNNER_HOST`, which overrides it; `default` (no `current`) is the
local server, which the CLI starts when needed. A named context's server is
someone else's: nothing is started for it.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from dmr.cli.context_store import (
    DEFAULT_CONTEXT,
    VALID_CONTEXT_NAME,
    ContextFileError,
    contexts_file,
    read_contexts,
)
from dmr.cli.errors import fail, warn

__all__ = ["context"]


class _Store:
    """The contexts file, changed under its lock and written whole."""

    def __init__(self) -> None:
        self.path = contexts_file()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            fail(f"unable to create the model context directory {self.path.parent}: {error}")

    def read(self) -> dict[str, Any]:
        try:
            return read_contexts(self.path)
        except ContextFileError as error:
            fail(str(error))

    def update(self, change: Any) -> None:
        from filelock import FileLock

        with FileLock(str(self.path.parent / "contexts.lock")):
            data = self.read()
            change(data)
            partial = self.path.with_name(f"{self.path.name}.tmp.{os.getpid()}")
            partial.write_text(json.dumps(data, indent=4) + "\n")
            partial.chmod(0o600)
            partial.replace(self.path)


def _check_name(name: str) -> None:
    if name == DEFAULT_CONTEXT:
        fail(f"context name {name!r} is reserved")
    if not VALID_CONTEXT_NAME.match(name):
        fail(f"invalid context name {name!r}: must match {VALID_CONTEXT_NAME.pattern}")


def _normalised_host(host: str) -> str:
    from urllib.parse import urlsplit

    if not host:
        fail("--host is required")
    parts = urlsplit(host)
    if not parts.scheme or not parts.netloc:
        fail("invalid --host URL: must include scheme and host, e.g. http://192.168.1.100:12434")
    if parts.scheme not in ("http", "https"):
        fail(f"invalid --host URL: unsupported scheme {parts.scheme!r} (must be http or https)")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError as error:
        fail(f"invalid --host URL: {error}")
    return parts.geturl()


@click.group(name="context")
def context() -> None:
    """Manage named Model Runner contexts (remote dmr or Docker Model Runner servers)."""


@context.command()
@click.argument("name")
@click.option(
    "--host", default="", help="Model Runner API base URL, e.g. http://192.168.1.100:12434"
)
@click.option("--tls", is_flag=True, help="Use TLS (https) for this context.")
@click.option("--tls-skip-verify", is_flag=True, help="Do not verify the server's certificate.")
@click.option("--tls-ca-cert", default="", help="CA certificate (PEM) to verify the server with.")
@click.option("--description", default="", help="A description for this context.")
def create(
    name: str, host: str, tls: bool, tls_skip_verify: bool, tls_ca_cert: str, description: str
) -> None:
    """Create a named context NAME pointing at a server."""
    _check_name(name)
    host = _normalised_host(host)
    ca_cert = ""
    if tls_ca_cert:
        ca_path = Path(tls_ca_cert).expanduser().absolute()
        try:
            ca_path.read_bytes()
        except OSError as error:
            fail(f"--tls-ca-cert: cannot read {str(ca_path)!r}: {error}")
        ca_cert = str(ca_path)
    entry = {
        "host": host,
        "tls": {"enabled": tls, "skipVerify": tls_skip_verify, "caCert": ca_cert},
        "description": description,
        "createdAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }

    def add(data: dict[str, Any]) -> None:
        if name in data["contexts"]:
            fail(f"context {name!r} already exists")
        data["contexts"][name] = entry

    _Store().update(add)
    click.echo(f'Context "{name}" created.')


@context.command()
@click.argument("name")
def use(name: str) -> None:
    """Make NAME the active context; `default` goes back to the local server."""
    if name != DEFAULT_CONTEXT:
        _check_name(name)

    def choose(data: dict[str, Any]) -> None:
        if name == DEFAULT_CONTEXT:
            data.pop("current", None)
            return
        if name not in data["contexts"]:
            fail(f"context {name!r} not found")
        data["current"] = name

    _Store().update(choose)
    click.echo(f'Current context is now "{name}".')


def _ls() -> None:
    data = _Store().read()
    current = data.get("current") or DEFAULT_CONTEXT
    if os.environ.get("MODEL_RUNNER_HOST"):
        warn(f"MODEL_RUNNER_HOST={os.environ['MODEL_RUNNER_HOST']!r} overrides the active context")
    from rich.table import Table

    from dmr.cli.main import print_table

    table = Table("NAME", "HOST", "DESCRIPTION", "CURRENT", box=None)
    rows = [(DEFAULT_CONTEXT, "(auto-detect)", "Local dmr server (started when needed)")]
    for name in sorted(data["contexts"]):
        entry = data["contexts"][name]
        rows.append((name, str(entry.get("host", "")), str(entry.get("description", ""))))
    for name, host, description in rows:
        table.add_row(name, host, description, "*" if name == current else "")
    print_table(table)


@context.command(name="ls")
def ls() -> None:
    """List contexts; the active one is marked with *."""
    _ls()


@context.command(name="list", hidden=True)
def list_contexts() -> None:
    """List contexts (alias of ls)."""
    _ls()


def _rm(names: tuple[str, ...]) -> None:
    failed: list[str] = []

    def remove(data: dict[str, Any]) -> None:
        for name in names:
            if name == DEFAULT_CONTEXT:
                failed.append(f"{name}: context name {name!r} is reserved and cannot be removed")
            elif name not in data["contexts"]:
                failed.append(f"{name}: context {name!r} not found")
            elif data.get("current") == name:
                failed.append(
                    f"{name}: context {name!r} is currently active; switch to another context first"
                )
            else:
                del data["contexts"][name]
                click.echo(f'Context "{name}" removed.')

    _Store().update(remove)
    if failed:
        for line in failed:
            click.echo(f"Error: {line}", err=True)
        fail("one or more contexts could not be removed")


@context.command()
@click.argument("names", nargs=-1, required=True)
def rm(names: tuple[str, ...]) -> None:
    """Remove one or more contexts (not the active one)."""
    _rm(names)


@context.command(name="remove", hidden=True)
@click.argument("names", nargs=-1, required=True)
def remove(names: tuple[str, ...]) -> None:
    """Remove one or more contexts (alias of rm)."""
    _rm(names)


@context.command()
@click.argument("names", nargs=-1, required=True)
def inspect(names: tuple[str, ...]) -> None:
    """Show contexts as JSON."""
    data = _Store().read()
    results: list[dict[str, Any]] = []
    for name in names:
        if name == DEFAULT_CONTEXT:
            results.append(
                {
                    "name": name,
                    "host": "(auto-detect)",
                    "tls": {"enabled": False},
                    "description": "Local dmr server (started when needed)",
                    "createdAt": "0001-01-01T00:00:00Z",
                }
            )
            continue
        entry = data["contexts"].get(name)
        if entry is None:
            fail(f"context {name!r} not found")
        results.append({"name": name, **entry})
    click.echo(json.dumps(results, indent=4))
