"""`dmr docker-plugin install|uninstall`: `docker model VERB ...` runs `dmr VERB ...`.

The Docker CLI finds its plugins as executables named `docker-<name>` in
`$DOCKER_CONFIG/cli-plugins` (default `~/.docker/cli-plugins`) and talks to them
through arguments only; no Docker daemon takes part (docs/clients.md):
- `docker-model docker-cli-plugin-metadata` must print the plugin's JSON metadata
  and exit 0, or the CLI does not offer the `model` command at all;
- `docker [GLOBAL OPTIONS] model VERB ...` runs
  `docker-model [GLOBAL OPTIONS] model VERB ...`;
- Docker Compose runs the plugin's file itself, without the `model` word:
  `docker-model ls --json`, `pull MODEL`, `configure ... MODEL -- FLAGS`,
  `status --json`.

The plugin written here is a small POSIX sh script that handles the first and
hands the others to `python -m dmr` with the interpreter that installed it (its
absolute path is written in), so it keeps working from any shell and venv.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import click

from dmr.cli.context_store import docker_config_dir
from dmr.cli.errors import fail, warn

__all__ = [
    "DOCKER_MODEL_CLI_VERSION",
    "PLUGIN_MARKER",
    "docker_config_dir",
    "docker_plugin",
    "plugin_metadata",
    "plugin_path",
    "plugin_script",
]

PLUGIN_NAME = "model"
# The line after the shebang: it tells this plugin from Docker's own `docker-model`,
# which `install` and `uninstall` leave alone unless told `--force`.
PLUGIN_MARKER = "# docker-model: written by `dmr docker-plugin install`"
# The version of Docker Model Runner's `docker model` CLI whose commands and JSON this
# plugin answers with. Compose reads it: only to a plugin of 1.0.6 or later does it
# pass a model's `runtime_flags` (`configure ... MODEL -- FLAGS`).
DOCKER_MODEL_CLI_VERSION = "1.0.6"

# The docker CLI's own global options that take a value: they come before `model`
# and mean nothing to dmr (`docker --context x model ls`).
_DOCKER_VALUE_OPTIONS = (
    "--config", "-c", "--context", "-H", "--host", "-l", "--log-level",
    "--tlscacert", "--tlscert", "--tlskey",
)  # fmt: skip


def plugin_path() -> Path:
    return docker_config_dir() / "cli-plugins" / f"docker-{PLUGIN_NAME}"


def plugin_metadata() -> dict[str, str]:
    """What `docker-model docker-cli-plugin-metadata` prints (docker/cli's plugin spec)."""
    from dmr import __version__

    return {
        "SchemaVersion": "0.1.0",
        "Vendor": "dmr",
        "Version": DOCKER_MODEL_CLI_VERSION,
        "ShortDescription": f"Docker Model Runner (dmr {__version__})",
    }


def plugin_script(python: str) -> str:
    """The plugin: metadata on request, else `python -m dmr VERB ...`."""
    metadata = json.dumps(plugin_metadata(), separators=(",", ":"))
    value_options = "|".join(_DOCKER_VALUE_OPTIONS)
    # -P: `-m dmr` must never import a `dmr` folder from whatever directory
    # `docker model` is run in.
    return f"""#!/bin/sh
{PLUGIN_MARKER}
# It runs dmr with the Python that installed it; `dmr docker-plugin uninstall` removes it.
python={shlex.quote(python)}
if [ "$1" = docker-cli-plugin-metadata ]; then
    printf '%s\\n' {shlex.quote(metadata)}
    exit 0
fi
# `docker [OPTIONS] model VERB ...` runs this as `docker-model [OPTIONS] model VERB ...`,
# Docker Compose as `docker-model VERB ...`: drop the docker CLI's options and `model`.
while [ "$#" -gt 0 ]; do
    case "$1" in
    {PLUGIN_NAME}) shift; break ;;
    {value_options}) shift; [ "$#" -gt 0 ] && shift ;;
    -*) shift ;;
    *) break ;;
    esac
done
exec "$python" -P -m dmr "$@"
"""


def _is_ours(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(256).decode(errors="replace")
    except OSError:
        return False
    return PLUGIN_MARKER in head


@click.group(name="docker-plugin")
def docker_plugin() -> None:
    """Install `docker model` as a Docker CLI plugin that runs dmr."""


@docker_plugin.command()
@click.option("--force", is_flag=True, help="Replace a docker-model that dmr did not write.")
def install(force: bool) -> None:
    """Write `docker-model` into $DOCKER_CONFIG/cli-plugins (default ~/.docker/cli-plugins)."""
    path = plugin_path()
    if (path.exists() or path.is_symlink()) and not _is_ours(path) and not force:
        fail(
            f"{path} exists and dmr did not write it (Docker's own model plugin?);"
            " `dmr docker-plugin install --force` replaces it"
        )
    if not sys.executable:
        fail("cannot tell which Python runs dmr (sys.executable is empty)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed over the old one (a link is replaced, not followed).
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_text(plugin_script(sys.executable))
        partial.chmod(0o755)
        partial.replace(path)
    except OSError as error:
        fail(f"cannot write {path}: {error}")
    click.echo(f"Installed {path}: `docker model VERB ...` now runs `dmr VERB ...`.")
    from shutil import which

    if which("docker") is None:
        warn("no `docker` command is on PATH; the plugin is used once one is")


@docker_plugin.command()
@click.option("--force", is_flag=True, help="Remove a docker-model that dmr did not write.")
def uninstall(force: bool) -> None:
    """Remove the `docker-model` that `dmr docker-plugin install` wrote."""
    path = plugin_path()
    if not path.exists() and not path.is_symlink():
        click.echo(f"No docker-model plugin at {path}.")
        return
    if not _is_ours(path) and not force:
        fail(f"{path} was not written by dmr; `--force` removes it anyway")
    try:
        path.unlink()
    except OSError as error:
        fail(f"cannot remove {path}: {error}")
    click.echo(f"Removed {path}.")
