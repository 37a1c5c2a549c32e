"""`dmr serve`, `dmr version` and `dmr plugins`."""

from __future__ import annotations

import os
from pathlib import Path

import click

from dmr.cli.main import console, plugin_command_entries
from dmr.settings import DEFAULT_PORT

__all__ = ["list_plugins", "serve", "version"]


@click.command()
@click.option(
    "--host", metavar="ADDRESS",
    help="Address to listen on (MODEL_RUNNER_BIND; default 127.0.0.1, 0.0.0.0 for every"
    " interface: set DMR_API_KEY then).",
)  # fmt: skip
@click.option(
    "--port", type=click.IntRange(1, 65535),
    help=f"TCP port (MODEL_RUNNER_PORT; default {DEFAULT_PORT}).",
)  # fmt: skip
@click.option(
    "--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
    help="Unix socket to listen on (MODEL_RUNNER_SOCK): instead of TCP, or beside it"
    " with --port or --host.",
)  # fmt: skip
@click.option(
    "--models-path", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
    help="The model store (MODELS_PATH; default ~/.docker/models).",
)  # fmt: skip
@click.option(
    "--ray-address", metavar="HOST:PORT",
    help="Place runners on the nodes of this Ray cluster (DMR_RAY_ADDRESS; needs the"
    " dmr-ray plugin).",
)  # fmt: skip
def serve(
    host: str | None,
    port: int | None,
    socket_path: Path | None,
    models_path: Path | None,
    ray_address: str | None,
) -> None:
    """Start the model runner server: TCP 127.0.0.1:12434 by default.

    Options override the environment variables named with them; --port and --socket
    together replace MODEL_RUNNER_PORT and MODEL_RUNNER_SOCK. Other `dmr` commands
    find this server when they get the same MODEL_RUNNER_PORT (or MODEL_RUNNER_SOCK)
    and MODELS_PATH; without one they start a server themselves.
    """
    from dmr.cli.errors import fail
    from dmr.server.serve import ListenError, run_server

    # Through the environment, which the runners and everything reading Settings share.
    env = os.environ
    if port is not None or socket_path is not None:
        env.pop("MODEL_RUNNER_PORT", None)
        env.pop("MODEL_RUNNER_SOCK", None)
    if port is not None or (host is not None and "MODEL_RUNNER_PORT" not in env):
        env["MODEL_RUNNER_PORT"] = str(port or DEFAULT_PORT)  # --host means TCP
    if host is not None:
        env["MODEL_RUNNER_BIND"] = host
    if socket_path is not None:
        env["MODEL_RUNNER_SOCK"] = str(socket_path.expanduser().absolute())
    if models_path is not None:
        env["MODELS_PATH"] = str(models_path.expanduser().absolute())
    if ray_address is not None:
        env["DMR_RAY_ADDRESS"] = ray_address
    try:
        run_server()
    except ListenError as error:
        fail(str(error))


@click.command()
def version() -> None:
    """Show the dmr version (client and server)."""
    from dmr import __version__
    from dmr.cli.client import connect
    from dmr.cli.http import HTTPError

    click.echo(f"Client version: {__version__}")
    try:
        with connect(timeout=5, autostart=False) as client:
            click.echo(f"Server version: {client.get('/version').json()['version']}")
    except (HTTPError, ValueError, KeyError):
        click.echo("Server version: (not running)")


@click.command(name="plugins")
def list_plugins() -> None:
    """List installed plugins, their versions, the hooks they implement and their commands."""
    from rich.table import Table

    from dmr import plugins

    table = Table("name", "distribution", "version", "hooks")
    for info in plugins.list_plugins():
        table.add_row(info.name, info.distribution or "", info.version or "", ", ".join(info.hooks))
    for entry in plugin_command_entries():
        dist, dist_version = (entry.dist.name, entry.dist.version) if entry.dist else ("", "")
        table.add_row(entry.value, dist, dist_version, f"command `dmr {entry.name}`")
    console.print(table)
