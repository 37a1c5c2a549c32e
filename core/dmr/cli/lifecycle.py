"""`start-runner`, `stop-runner`, `restart-runner`: the server's lifecycle, by Docker
Model Runner's names. Other commands start the server themselves when needed
(dmr.cli.autostart); these do it on purpose, so `DMR_NO_AUTOSTART` does not stop them.
"""

from __future__ import annotations

import click

from dmr.cli.autostart import (
    ServerProcess,
    ServerUnavailableError,
    ensure_server,
    explicit_address,
    served_address,
    start_server,
    stop_server,
)
from dmr.cli.errors import fail
from dmr.settings import Settings

__all__ = ["restart_runner", "start_runner", "stop_runner"]


def _start(settings: Settings) -> None:
    if explicit_address() is not None:  # someone else's server: report on it, start nothing
        try:
            server = ensure_server()
        except ServerUnavailableError as error:
            fail(str(error))
    else:
        server = start_server(settings)  # says "Started the dmr server ..." on stderr
        if server.started_here:
            return
    which = f" (pid {server.pid})" if server.pid is not None else ""
    click.echo(f"The dmr server is already running{which} at {server.address}.")


def _stop(settings: Settings) -> None:
    pid = stop_server(settings)
    if pid is not None:
        click.echo(f"Stopped the dmr server (pid {pid}).")
        return
    address = served_address(settings)
    if address.answers():
        pid_file = ServerProcess.for_settings(settings).pid_file
        fail(
            f"a server answers at {address}, but no pid file names it ({pid_file});"
            " stop it where it was started"
        )
    click.echo("No dmr server is running.")


@click.command(name="start-runner")
def start_runner() -> None:
    """Start the dmr server in the background, unless one already answers."""
    _start(Settings.from_env())


@click.command(name="stop-runner")
def stop_runner() -> None:
    """Stop the dmr server of this environment (and its runners); fine if none runs."""
    _stop(Settings.from_env())


@click.command(name="restart-runner")
def restart_runner() -> None:
    """Stop the dmr server of this environment, then start a new one."""
    settings = Settings.from_env()
    _stop(settings)
    _start(settings)
