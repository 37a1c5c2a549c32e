"""Serve the app with hypercorn on TCP, 127.0.0.1:12434 by default (`MODEL_RUNNER_PORT`,
`MODEL_RUNNER_BIND`), and on a unix socket when one is named (`MODEL_RUNNER_SOCK`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket

from hypercorn.asyncio import serve
from hypercorn.config import Config

from dmr.server import client_connections
from dmr.server.app import STARTUP_ERROR, create_app
from dmr.server_process import ServerProcess, is_dmr_serve
from dmr.settings import Settings

__all__ = [
    "AddressInUseError",
    "ListenError",
    "address_in_use_message",
    "hypercorn_config",
    "run_server",
    "tcp_bind",
]


class ListenError(Exception):
    """The server cannot listen where it was told; the message says why, for the CLI."""


class AddressInUseError(ListenError):
    """The TCP address is taken; the message names what holds it and how to choose another."""


def tcp_bind(settings: Settings) -> str | None:
    """hypercorn's bind for the TCP listener, `127.0.0.1:12434`; None without one."""
    if settings.port is None:
        return None
    host = settings.host
    return f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    tcp = tcp_bind(settings)
    config.bind = [tcp] if tcp is not None else []
    if settings.socket_path is not None:
        settings.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            settings.socket_path.unlink()  # a stale socket from a killed server
        config.bind.append(f"unix:{settings.socket_path}")
    if not config.bind:
        raise ValueError("nothing to listen on: neither a TCP port nor a unix socket is set")
    if settings.tls_cert and settings.tls_key:
        config.certfile = str(settings.tls_cert)
        config.keyfile = str(settings.tls_key)
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = settings.log_level
    # Streams of generated tokens can be silent for a while (long prompts on CPU).
    config.keep_alive_timeout = 75
    config.graceful_timeout = 5
    return config


def run_server(settings: Settings | None = None) -> None:
    settings = settings or Settings.from_env()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.log_dir is not None:
        from dmr.server.logs_api import server_log_handler

        try:
            logging.getLogger().addHandler(server_log_handler(settings.log_dir))
        except OSError as error:  # a read-only store must not keep the server from serving
            logging.getLogger(__name__).warning(
                "cannot write the server log in %s (`dmr logs` will show none): %s",
                settings.log_dir,
                error,
            )
    # Before the app starts its services (probes, the scheduler): a taken port is the
    # commonest start-up failure, and says at once what to do about it.
    _check_port_free(settings)
    pid_file = _write_pid_file(settings)
    try:
        app = create_app(settings)
        config = hypercorn_config(settings)
        client_connections.install()  # for direct streams (dmr/direct_streams.py)

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

        try:
            asyncio.run(main())
        except OSError as error:
            if error.errno != errno.EADDRINUSE or settings.port is None:
                raise
            raise AddressInUseError(address_in_use_message(settings)) from error
        except Exception as error:
            failed = app.extensions.get(STARTUP_ERROR)
            if failed is None:
                raise
            raise ListenError(f"the server did not start: {failed}") from error
    finally:
        if pid_file is not None:
            pid_file.remove(os.getpid())  # only while it names this process


def _write_pid_file(settings: Settings) -> ServerProcess | None:
    """Record this server's pid for `dmr stop-runner` and the CLI's auto-start
    (docs/operations.md), whoever started it; None when it cannot be written."""
    pid_file = ServerProcess.for_settings(settings)
    running = pid_file.running_pid()
    if running is not None and running != os.getpid():
        # Another live server of this store and port: this one will find the port
        # taken, and must leave that server's pid file for `dmr stop-runner`.
        return None
    try:
        pid_file.write(os.getpid())
    except OSError as error:  # a read-only store must not keep the server from serving
        logging.getLogger(__name__).warning("cannot write %s: %s", pid_file.pid_file, error)
        return None
    return pid_file


def _check_port_free(settings: Settings) -> None:
    """Bind the TCP address as hypercorn will (SO_REUSEADDR), then let it go; raise
    AddressInUseError when something listens there. hypercorn's own bind error is
    caught too, for a port taken between the two."""
    if settings.port is None:
        return
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, settings.port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise AddressInUseError(address_in_use_message(settings)) from error
            where = tcp_bind(settings)
            raise ListenError(f"cannot listen on {where}: {error.strerror or error}") from error


def address_in_use_message(settings: Settings) -> str:
    """What holds the port (pid and command line where the system tells), and how to
    choose another; the CLI prints it as its error, and an auto-start shows it from the log."""
    port = settings.port
    holder, dmr_holds_it = _port_holder(port) if port is not None else ("", False)
    message = f"cannot listen on {tcp_bind(settings)}: the address is already in use"
    if holder:
        message += f" by {holder}"
    if dmr_holds_it:
        message += " (a dmr server: `dmr stop-runner` stops it, with the same MODEL_RUNNER_PORT)"
    return (
        f"{message}. Choose another port: `dmr serve --port N`, or MODEL_RUNNER_PORT=N"
        " (for the commands too, so that they find this server)"
    )


def _port_holder(port: int) -> tuple[str, bool]:
    """("pid 123 (python -m dmr serve)", whether it is a dmr server), or ("", False)
    when the system does not say (another user's process, or no permission)."""
    import psutil

    try:
        holders = [
            connection
            for connection in psutil.net_connections(kind="tcp")
            if connection.laddr
            and connection.laddr.port == port
            and connection.status == psutil.CONN_LISTEN
        ]
    except (OSError, psutil.Error):
        return "", False
    if not holders:
        return "", False
    pid = next((c.pid for c in holders if c.pid is not None), None)
    if pid is None:
        return "a process this user cannot see (another user's?)", False
    try:
        command = psutil.Process(pid).cmdline()
    except psutil.Error:
        return f"pid {pid}", False
    shown = " ".join(command)
    shown = shown if len(shown) <= 100 else shown[:99] + "…"
    return f"pid {pid} ({shown})", is_dmr_serve(command)
