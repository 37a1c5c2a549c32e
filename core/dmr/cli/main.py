"""`dmr`: the CLI entry point. Commands live in one module per topic."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from dmr import __version__, plugins

__all__ = ["app", "main"]

app = typer.Typer(
    name="dmr",
    help="Pull, store and serve AI models (a Python Docker Model Runner).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.command()
def serve() -> None:
    """Start the model runner server (unix socket, or TCP with MODEL_RUNNER_PORT)."""
    from dmr.server.serve import run_server

    run_server()


@app.command()
def version() -> None:
    """Show the dmr version (client and server)."""
    from dmr.cli.client import connect

    console.print(f"Client version: {__version__}")
    try:
        with connect(timeout=5) as client:
            console.print(f"Server version: {client.get('/version').json()['version']}")
    except Exception:
        console.print("Server version: (not running)")


@app.command(name="plugins")
def list_plugins() -> None:
    """List installed plugins, their versions and the hooks they implement."""
    from rich.table import Table

    table = Table("name", "distribution", "version", "hooks")
    for info in plugins.list_plugins():
        table.add_row(info.name, info.distribution or "", info.version or "", ", ".join(info.hooks))
    console.print(table)


def _register_topic_commands() -> None:
    # Imported for their side effect of adding commands to `app`.
    import importlib

    for module in (
        "dmr.cli.models",
        "dmr.cli.runners",
        "dmr.cli.quickstart",
        "dmr.cli.transfer",
        "dmr.cli.bench",
        "dmr.cli.observe",
    ):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


def _register_plugin_commands() -> None:
    for command in plugins.cli_commands():
        if command.group is not None:
            app.add_typer(command.group, name=command.name, help=command.help)
        elif command.callback is not None:
            app.command(name=command.name, help=command.help)(command.callback)


def main() -> None:
    _register_topic_commands()
    _register_plugin_commands()
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
