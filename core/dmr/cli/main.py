"""`dmr`: the CLI entry point. Commands live in one module per topic.

A command must answer in a fraction of a second (docs/benchmarks.md), so:
- the CLI is plain click (Quart already depends on it); typer, which builds a
  pydantic adapter per parameter, cost a bare command 150-200 ms on 2 cores;
- a command's module is imported only when that command runs (`COMMANDS`), and
  nothing heavy is imported at the top of a topic module: no plugin, engine,
  server or registry code until a command needs it;
- plugin commands come from the `dmr.cli` entry-point group, read only when the
  command asked for is not a built-in one (and for `--help`).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from rich.console import Console

__all__ = [
    "ALIASES",
    "COMMANDS",
    "PLUGIN_COMMAND_GROUP",
    "cli",
    "console",
    "err_console",
    "main",
    "print_table",
]

PLUGIN_COMMAND_GROUP = "dmr.cli"

# Each built-in command: "module:attribute" of its click command, in `--help` order.
COMMANDS: dict[str, str] = {
    "serve": "dmr.cli.server:serve",
    "start-runner": "dmr.cli.lifecycle:start_runner",
    "stop-runner": "dmr.cli.lifecycle:stop_runner",
    "restart-runner": "dmr.cli.lifecycle:restart_runner",
    "install-runner": "dmr.cli.lifecycle:install_runner",
    "reinstall-runner": "dmr.cli.lifecycle:reinstall_runner",
    "uninstall-runner": "dmr.cli.lifecycle:uninstall_runner",
    "version": "dmr.cli.server:version",
    "status": "dmr.cli.runners:status",
    "quickstart": "dmr.cli.quickstart:quickstart",
    "search": "dmr.cli.search:search",
    "pull": "dmr.cli.transfer:pull",
    "push": "dmr.cli.transfer:push",
    "package": "dmr.cli.models:package",
    "list": "dmr.cli.models:list_models",
    "ls": "dmr.cli.models:ls",
    "inspect": "dmr.cli.models:inspect",
    "show": "dmr.cli.models:show",
    "tag": "dmr.cli.models:tag",
    "rm": "dmr.cli.models:rm",
    "df": "dmr.cli.models:df",
    "purge": "dmr.cli.models:purge",
    "run": "dmr.cli.runners:run",
    "ps": "dmr.cli.runners:ps",
    "unload": "dmr.cli.runners:unload",
    "stop": "dmr.cli.runners:stop",
    "configure": "dmr.cli.configure:configure",
    "logs": "dmr.cli.observe:logs",
    "requests": "dmr.cli.observe:requests",
    "bench": "dmr.cli.bench:bench",
    "plugins": "dmr.cli.server:list_plugins",
    "docker-plugin": "dmr.cli.docker_plugin:docker_plugin",
    "context": "dmr.cli.contexts:context",
    "compose": "dmr.cli.compose:compose",
    "launch": "dmr.cli.launch:launch",
}


# Other names a command answers to, as `docker model` has them (not listed in --help).
ALIASES: dict[str, str] = {"config": "configure"}


class _LazyConsole:
    """rich's Console, created on first use: commands that print no table never import rich."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return getattr(self._console, name)


console: Console = _LazyConsole()  # type: ignore[assignment]
err_console: Console = _LazyConsole(stderr=True)  # type: ignore[assignment]


def print_table(table: Any) -> None:
    """A rich table on stdout; piped, 250 columns wide (rich would assume 80 and cut
    names that `grep` and scripts need whole)."""
    if console.is_terminal:
        console.print(table)
    else:
        from rich.console import Console

        Console(width=250).print(table)


def plugin_command_entries() -> list[EntryPoint]:
    """The `dmr.cli` entry points, less those `DMR_DISABLED_PLUGINS` names."""
    from importlib.metadata import entry_points

    disabled = {n.strip() for n in os.environ.get("DMR_DISABLED_PLUGINS", "").split(",")}
    found = entry_points(group=PLUGIN_COMMAND_GROUP)
    return [entry for entry in found if entry.name not in disabled]


def _origin(entry: EntryPoint) -> str:
    return f"{entry.value} ({entry.dist.name})" if entry.dist else entry.value


def _load_plugin_command(entry: EntryPoint) -> click.Command | None:
    """The click command an entry point names; a broken one is reported, not fatal."""
    from dmr.cli.errors import warn

    try:
        target = entry.load()
    except Exception as error:  # a broken plugin must not take the CLI down
        warn(f"the plugin command {entry.name!r} from {_origin(entry)} failed to load: {error}")
        return None
    if isinstance(target, click.Command):
        return target
    warn(f"the plugin command {entry.name!r} from {_origin(entry)} is not a click command")
    return None


class DmrGroup(click.Group):
    """The `dmr` group: built-in commands imported on use, then plugin commands."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = list(COMMANDS)
        names.extend(entry.name for entry in self._plugin_entries() if entry.name not in names)
        return names

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(ALIASES.get(cmd_name, cmd_name))
        if target is not None:
            module_name, attribute = target.split(":")
            command = getattr(importlib.import_module(module_name), attribute)
            assert isinstance(command, click.Command), target
            return command
        for entry in self._plugin_entries():
            if entry.name == cmd_name:
                return _load_plugin_command(entry)
        return None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # click would print "Aborted!" and exit 1
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    def _plugin_entries(self) -> list[EntryPoint]:
        """Plugin commands, less (with a warning, once) any that shadows a built-in."""
        from dmr.cli.errors import warn

        if not hasattr(self, "_entries"):
            self._entries: list[EntryPoint] = []
            for entry in plugin_command_entries():
                if entry.name in COMMANDS:
                    warn(f"the plugin command {entry.name!r} from {_origin(entry)} is ignored: "
                         f"`dmr {entry.name}` is a built-in command")  # fmt: skip
                else:
                    self._entries.append(entry)
        return self._entries


cli = DmrGroup(
    name="dmr",
    help="Pull, store and serve AI models (a Python Docker Model Runner).",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def main() -> None:
    cli.main(prog_name="dmr")
