"""Serve the app with hypercorn on a unix socket (default) or TCP (`MODEL_RUNNER_PORT`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from hypercorn.asyncio import serve
from hypercorn.config import Config

from dmr.cli.autostart import ServerProcess
from dmr.server.app import create_app
from dmr.settings import Settings

__all__ = ["hypercorn_config", "run_server"]


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    if settings.port is not None:
        host = settings.host
        config.bind = [f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"]
    else:
        settings.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            settings.socket_path.unlink()  # a stale socket from a killed server
        config.bind = [f"unix:{settings.socket_path}"]
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
    pid_file = _write_pid_file(settings)
    try:
        app = create_app(settings)
        config = hypercorn_config(settings)

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

        asyncio.run(main())
    finally:
        if pid_file is not None:
            pid_file.remove(os.getpid())  # only while it names this process


def _write_pid_file(settings: Settings) -> ServerProcess | None:
    """Record this server's pid for `dmr stop-runner` and the CLI's auto-start
    (docs/operations.md), whoever started it; None when it cannot be written."""
    pid_file = ServerProcess.for_settings(settings)
    try:
        pid_file.write(os.getpid())
    except OSError as error:  # a read-only store must not keep the server from serving
        logging.getLogger(__name__).warning("cannot write %s: %s", pid_file.pid_file, error)
        return None
    return pid_file
