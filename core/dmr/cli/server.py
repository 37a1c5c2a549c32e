"""`dmr serve`, `dmr version` and `dmr plugins`."""

from __future__ import annotations

import click

from dmr.cli.main import console, plugin_command_entries

__all__ = ["list_plugins", "serve", "version"]


@click.command()
def serve() -> None:
    """Start the model runner server (unix socket, or TCP with MODEL_RUNNER_PORT)."""
    from dmr.server.serve import run_server

    run_server()


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
