"""`start-runner`, `stop-runner`, `restart-runner`: the server's lifecycle, by Docker
Model Runner's names. Other commands start the server themselves when needed
(dmr.cli.autostart); these do it on purpose, so `DMR_NO_AUTOSTART` does not stop them.

Docker Model Runner's flags here configure a container; each takes its nearest
meaning for a local server (docs/compatibility.md §8):
- `--port`, `--host`: where the server listens (`MODEL_RUNNER_PORT`,
  `MODEL_RUNNER_BIND` for the server started);
- `--gpu none` hides the GPUs from the server and its runners (the
  `*_VISIBLE_DEVICES` variables set empty); `cuda` and `rocm` check that a device
  of that kind is found; `auto` is the default; `musa` and `cann` are refused
  (no probe or engine of dmr's drives them);
- `--backend`: the engine that must be installed (DMR pulls an image with it),
  else the exact command that installs it;
- `--debug`: the server logs at debug level; `--do-not-track`: accepted, dmr
  sends no usage data at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from dmr.cli.autostart import (
    ServerUnavailableError,
    ensure_server,
    explicit_address,
    served_address,
    start_server,
    stop_server,
)
from dmr.cli.errors import fail, warn
from dmr.server_process import ServerProcess
from dmr.settings import Settings

__all__ = [
    "GPU_MODES",
    "install_runner",
    "reinstall_runner",
    "restart_runner",
    "start_runner",
    "stop_runner",
    "uninstall_runner",
]

# `--gpu` values as Docker Model Runner spells them, and the device kind of dmr's
# hardware probes each asks for (None: no check).
GPU_MODES: dict[str, str | None] = {"auto": None, "none": None, "cuda": "cuda", "rocm": "rocm"}
_UNDRIVEN_GPU_MODES = ("musa", "cann")
# What hides the GPUs of each vendor from a process and its children.
_GPU_HIDING_VARIABLES = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


def _start(settings: Settings, options: RunnerOptions | None = None) -> None:
    if explicit_address() is not None:  # someone else's server: report on it, start nothing
        try:
            server = ensure_server()
        except ServerUnavailableError as error:
            fail(str(error))
    else:
        server = start_server(settings)  # says "Started the dmr server ..." on stderr
        if not server.started_here:
            which = f" (pid {server.pid})" if server.pid is not None else ""
            click.echo(f"The dmr server is already running{which} at {server.address}.")
        elif options is not None and options.port is not None and options.port != 12434:
            click.echo(
                f"Other dmr commands find this server with MODEL_RUNNER_PORT={options.port}"
                f" (or MODEL_RUNNER_HOST={server.address})."
            )
    if options is not None:
        _check_started(options, server.address.base_url, server.address.socket_path)


class RunnerOptions:
    """start-runner's and restart-runner's Docker Model Runner flags (module docstring)."""

    def __init__(
        self, port: int | None, host: str | None, gpu: str, backend: str | None, debug: bool
    ) -> None:
        if gpu in _UNDRIVEN_GPU_MODES:
            fail(f"--gpu {gpu}: dmr has no hardware probe or engine for {gpu.upper()} devices")
        self.port, self.host, self.gpu, self.backend, self.debug = port, host, gpu, backend, debug

    def apply_to_environment(self) -> None:
        """The started server inherits this environment (dmr.cli.autostart)."""
        if self.port is not None:
            os.environ["MODEL_RUNNER_PORT"] = str(self.port)
        if self.host is not None:
            os.environ["MODEL_RUNNER_BIND"] = self.host
        if self.debug:
            os.environ["LOG_LEVEL"] = "DEBUG"
        if self.gpu == "none":
            for variable in _GPU_HIDING_VARIABLES:
                os.environ[variable] = ""


def _check_started(options: RunnerOptions, base_url: str, socket_path: Any) -> None:
    """`--backend` and `--gpu cuda|rocm` asked for something: is it there?"""
    wanted_kind = GPU_MODES.get(options.gpu)
    if options.backend is None and wanted_kind is None:
        return
    from dmr.cli.client import auth_headers
    from dmr.cli.http import HTTPError, ServerClient
    from dmr.engine_install_hints import install_hint

    socket = str(socket_path) if socket_path else None
    with ServerClient(base_url, socket_path=socket, headers=auth_headers()) as client:
        try:
            engines: dict[str, str] = client.get("/engines/status").json()
            hardware: dict[str, Any] = client.get("/engines/hardware").json()
        except (HTTPError, ValueError) as error:
            fail(f"cannot read the server's engines: {error}")
    if options.backend is not None:
        state = engines.get(options.backend)
        if state is None:
            fail(
                f"--backend {options.backend}: no such engine (known: {', '.join(sorted(engines))})"
            )
        if state.startswith("Not Installed"):
            fail(
                f"--backend {options.backend}: the engine is not installed; install it with"
                f" `{install_hint(options.backend).split(' (')[0]}`, then `dmr restart-runner`"
            )
    if wanted_kind is not None:
        kinds = {device.get("kind") for device in hardware.get("devices", [])}
        if wanted_kind not in kinds:
            found = ", ".join(sorted(kind for kind in kinds if kind)) or "none"
            warn(
                f"--gpu {options.gpu}: the server found no {wanted_kind} device"
                f" (found: {found}); models run on the CPU"
            )


def _runner_options(*, backend: bool) -> Callable[[Any], Any]:
    """DMR's runner flags (cmd/cli/commands/utils.go addRunnerFlags)."""

    def decorate(function: Any) -> Any:
        options = [
            click.option("--port", type=click.IntRange(1, 65535),
                         help="TCP port the server listens on (default 12434)."),
            click.option("--host", help="Address the server binds (default 127.0.0.1)."),
            click.option("--gpu", type=click.Choice([*GPU_MODES, *_UNDRIVEN_GPU_MODES]),
                         default="auto", show_default=True,
                         help="GPU support: none hides the GPUs; cuda|rocm check one is found."),
            click.option("--debug", is_flag=True, help="Log at debug level."),
            click.option("--do-not-track", is_flag=True,
                         help="Accepted for DMR's sake: dmr sends no usage data."),
        ]  # fmt: skip
        if backend:
            options.append(
                click.option(
                    "--backend", help="Engine that must be installed (llama.cpp, vllm, ...)."
                )
            )
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


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


def _refused(flag: str, reason: str, *, takes_value: bool = False) -> Callable[[Any], Any]:
    """A DMR flag dmr does not take: listed in --help, a clear error when given."""

    def refuse(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value not in (None, False, ()):
            fail(f"{flag}: {reason}")
        return value

    return click.option(
        flag, is_flag=not takes_value, expose_value=False, callback=refuse,
        help=f"Refused: {reason}.",
    )  # fmt: skip


_TLS_REASON = (
    "a server the CLI starts speaks HTTP; run `dmr serve` with MODEL_RUNNER_TLS_CERT and"
    " MODEL_RUNNER_TLS_KEY for HTTPS (docs/security.md)"
)
_CONTAINER_FLAGS_REFUSED = [
    _refused("--proxy-cert", "no container: the server uses this machine's CA store and "
             "HTTPS_PROXY", takes_value=True),
    _refused("--tls", _TLS_REASON),
    _refused("--tls-port", _TLS_REASON, takes_value=True),
    _refused("--tls-cert", _TLS_REASON, takes_value=True),
    _refused("--tls-key", _TLS_REASON, takes_value=True),
]  # fmt: skip
_LLAMA_VERSION_REFUSED = _refused(
    "--llama-server-version",
    "dmr's llama.cpp is llama-cpp-python's (pip); LLAMA_SERVER_PATH names a native llama-server",
    takes_value=True,
)
_MODELS_REFUSED = _refused(
    "--models", "it would delete the model store; `dmr purge` does that on purpose"
)


def _with(function: Any, *decorators: Callable[[Any], Any]) -> Any:
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _start_command(
    name: str, summary: str, *, llama_version: bool, restart: bool = False
) -> click.Command:
    """`start-runner`/`install-runner`, or with `restart` `restart-runner`/`reinstall-runner`,
    which first stop the server running now, where it listens now."""

    def start(
        port: int | None, host: str | None, gpu: str, debug: bool, do_not_track: bool,
        backend: str | None,
    ) -> None:  # fmt: skip
        options = RunnerOptions(port, host, gpu, backend, debug)
        if restart:
            _stop(Settings.from_env())
        options.apply_to_environment()
        _start(Settings.from_env(), options)

    start.__doc__ = summary
    start.__name__ = "restart" if restart else "start"
    extra = [_LLAMA_VERSION_REFUSED] if llama_version else []
    decorated = _with(start, _runner_options(backend=True), *_CONTAINER_FLAGS_REFUSED, *extra)
    return click.command(name=name)(decorated)


def _stop_command(name: str, summary: str, *refused: Callable[[Any], Any]) -> click.Command:
    def stop() -> None:
        _stop(Settings.from_env())

    stop.__doc__ = summary
    return click.command(name=name)(_with(stop, _MODELS_REFUSED, *refused))


start_runner = _start_command(
    "start-runner",
    "Start the dmr server in the background, unless one already answers.",
    llama_version=False,
)
stop_runner = _stop_command(
    "stop-runner", "Stop the dmr server of this environment (and its runners); fine if none runs."
)
restart_runner = _start_command(
    "restart-runner",
    "Stop the dmr server of this environment, then start a new one (with these flags).",
    llama_version=False,
    restart=True,
)
# Docker Model Runner installs its runner as a container; dmr's is installed with pip,
# so these are start-runner, restart-runner and stop-runner by DMR's other names.
install_runner = _start_command(
    "install-runner",
    "Start the dmr server (installed with pip, nothing else to install): start-runner.",
    llama_version=True,
)
reinstall_runner = _start_command(
    "reinstall-runner",
    "Restart the dmr server with these flags (nothing to reinstall): restart-runner.",
    llama_version=True,
    restart=True,
)


def _uninstall_backend(backend: str) -> None:
    """`uninstall-runner --backend NAME`, as DMR: POST /engines/uninstall-backend. dmr's
    answer for an installed engine is the `pip uninstall` that removes it."""
    from dmr.cli.client import ServerUnavailableError, connect
    from dmr.cli.errors import error_message
    from dmr.cli.http import HTTPError

    try:
        with connect() as client:
            answer = client.post("/engines/uninstall-backend", json={"backend": backend})
    except ServerUnavailableError as error:
        fail(str(error))
    except HTTPError as error:
        fail(f"failed to uninstall {backend} backend: {error}")
    if answer.status_code >= 400:
        fail(f"failed to uninstall {backend} backend: {error_message(answer)}")
    click.echo(f"Uninstalled {backend} backend")


@click.command(name="uninstall-runner")
@_MODELS_REFUSED
@_refused("--images", "dmr runs no container images; nothing to remove")
@click.option("--backend", help="Uninstall an engine (as DMR: through the running server).")
def uninstall_runner(backend: str | None) -> None:
    """Stop the dmr server (`pip uninstall dmr` removes dmr itself): stop-runner; with
    --backend, remove that engine instead."""
    if backend:
        _uninstall_backend(backend)
        return
    _stop(Settings.from_env())
