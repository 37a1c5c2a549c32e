"""docs/compatibility.md §9 stays true: every `docker model` command and flag is in the
table, each supported or mapped one exists in the real `dmr` command tree, each
refused one is refused with a reason (and, where dmr lists it, refused when given)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from dmr.cli.main import ALIASES, cli

TABLE = Path(__file__).parents[1] / "docs" / "compatibility.md"

# Docker Model Runner's CLI (cmd/cli/commands/*.go, July 2026): each command and its
# flags, as cobra registers them. The table must cover all of them.
DMR_CLI: dict[str, list[str]] = {
    "version": [],
    "context": [],
    "context create": ["--host", "--tls", "--tls-skip-verify", "--tls-ca-cert", "--description"],
    "context use": [],
    "context ls": [],
    "context rm": [],
    "context inspect": [],
    "install-runner": [
        "--port", "--host", "--gpu", "--backend", "--llama-server-version", "--do-not-track",
        "--debug", "--proxy-cert", "--tls", "--tls-port", "--tls-cert", "--tls-key",
    ],
    "reinstall-runner": [
        "--port", "--host", "--gpu", "--backend", "--llama-server-version", "--do-not-track",
        "--debug", "--proxy-cert", "--tls", "--tls-port", "--tls-cert", "--tls-key",
    ],
    "uninstall-runner": ["--models", "--images", "--backend"],
    "start-runner": [
        "--port", "--host", "--gpu", "--backend", "--do-not-track", "--debug", "--proxy-cert",
        "--tls", "--tls-port", "--tls-cert", "--tls-key",
    ],
    "stop-runner": ["--models"],
    "restart-runner": ["--port", "--host", "--gpu", "--do-not-track", "--debug", "--proxy-cert"],
    "search": ["-n", "--limit", "--source", "--json"],
    "skills": ["--codex", "--claude", "--opencode", "--dest", "-f", "--force"],
    "gateway": ["-c", "--config", "--host", "-p", "--port", "-v", "--verbose"],
    "status": ["--json"],
    "pull": [],
    "push": [],
    "list": ["--json", "--openai", "-q", "--quiet", "--openaiurl"],
    "logs": ["-f", "--follow", "--no-engines"],
    "rm": ["-f", "--force"],
    "inspect": ["--openai", "-r", "--remote"],
    "show": ["-r", "--remote"],
    "compose": ["--project-name"],
    "compose up": [
        "--model", "--context-size", "--runtime-flags", "--backend", "--speculative-draft-model",
        "--speculative-num-tokens", "--speculative-min-acceptance-rate",
    ],
    "compose down": [],
    "compose metadata": [],
    "launch": ["--port", "--image", "--detach", "--dry-run", "--config", "--model"],
    "tag": [],
    "configure": [
        "--context-size", "--speculative-draft-model", "--speculative-num-tokens",
        "--speculative-min-acceptance-rate", "--hf_overrides", "--gpu-memory-utilization",
        "--think", "--mode", "--keep-alive",
    ],
    "configure show": [],
    "ps": [],
    "df": [],
    "unload": ["--all", "--backend"],
    "requests": ["-f", "--follow", "--include-existing", "--model"],
    "purge": ["-f", "--force"],
    "bench": ["--prompt", "--duration", "--json", "--concurrency", "--timeout"],
    "run": ["--debug", "--color", "-d", "--detach", "--openaiurl", "--websearch"],
    "package": [
        "--gguf", "--safetensors-dir", "--dduf", "--from", "--chat-template", "-l", "--license",
        "--mmproj", "--push", "--context-size", "--format",
    ],
}  # fmt: skip
# cobra aliases DMR declares, which dmr answers to as well.
DMR_ALIASES = {"ls": "list", "stop": "unload", "config": "configure"}


def table_rows() -> list[tuple[str, list[str], str, str]]:
    """(command, flag spellings, status, how) for each row of §9; a spelling may carry
    a value (`--format cncf`)."""
    text = TABLE.read_text()
    section = text[text.index("## 9. Every `docker model` command and flag") :]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        command, flags, status, how = cells
        if status == "dmr":
            continue  # the header
        spellings = re.findall(r"`([^`]+)`", flags)
        rows.append((command.strip("`"), spellings, status, how))
    return rows


# `dmr configure show` is read by `configure` from its MODEL argument (configure's
# own FLAGS take the rest), so it is no click subcommand of it.
DISPATCHED = {"configure show": "dmr.cli.configure:show"}


def dmr_command(path: str) -> click.Command:
    if path in DISPATCHED:
        import importlib

        module, attribute = DISPATCHED[path].split(":")
        found = getattr(importlib.import_module(module), attribute)
        assert isinstance(found, click.Command)
        return found
    command: click.Command = cli
    context = click.Context(cli)
    for word in path.split():
        assert isinstance(command, click.Group), f"`dmr {path}`: {command.name} has no subcommands"
        found = command.get_command(context, word)
        assert found is not None, f"`dmr {path}` does not exist"
        command = found
    return command


def spellings_of(command: click.Command) -> set[str]:
    return {
        opt
        for param in command.params
        if isinstance(param, click.Option)
        for opt in (*param.opts, *param.secondary_opts)
    }


def test_every_dmr_command_and_flag_is_in_the_table() -> None:
    covered = {
        (command, flag.split()[0]) for command, flags, _, _ in table_rows() for flag in flags
    }
    commands = {command for command, flags, _, _ in table_rows() if not flags}
    for command, flags in DMR_CLI.items():
        assert command in commands, f"`docker model {command}` has no row"
        for flag in flags:
            assert (command, flag) in covered, f"`docker model {command} {flag}` has no row"


def test_each_row_is_explained() -> None:
    for command, flags, status, how in table_rows():
        assert status in {"supported", "mapped", "refused"}, (command, flags, status)
        if status != "supported":
            assert how, f"`{command} {' '.join(flags)}` is {status} without saying how or why"


@pytest.mark.parametrize("row", table_rows(), ids=lambda row: f"{row[0]} {' '.join(row[1])}")
def test_supported_and_mapped_rows_exist_in_dmr(row: tuple[str, list[str], str, str]) -> None:
    command_path, flags, status, _ = row
    if status == "refused":
        return
    command = dmr_command(command_path)
    for flag in flags:
        name = flag.split()[0]
        assert name in spellings_of(command), f"`dmr {command_path}` has no {name}"


def test_refused_flags_that_dmr_lists_are_refused_with_the_reason() -> None:
    for command_path, flags, status, _ in table_rows():
        if (
            status != "refused"
            or not flags
            or command_path.split()[0] not in cli.list_commands(click.Context(cli))
        ):
            continue
        command = dmr_command(command_path)
        for spelling in flags:
            flag, *given = spelling.split()
            if flag not in spellings_of(command):
                continue  # a flag dmr does not list: click refuses it as unknown
            [option] = [p for p in command.params if flag in getattr(p, "opts", [])]
            value = given or ([] if getattr(option, "is_flag", False) else ["x"])
            arguments = [
                "x" for p in command.params if isinstance(p, click.Argument) and p.required
            ]
            result = subprocess.run(
                [sys.executable, "-m", "dmr", *command_path.split(), flag, *value, *arguments],
                capture_output=True, text=True, timeout=60,
                env={"DMR_NO_AUTOSTART": "1", "PATH": "/usr/bin:/bin"},
            )  # fmt: skip
            assert result.returncode == 1, (command_path, flag, result.stderr)
            assert result.stderr.startswith(f"error: {spelling}: "), result.stderr


def test_dmr_answers_to_dmrs_aliases() -> None:
    context = click.Context(cli)
    for alias, target in DMR_ALIASES.items():
        command = cli.get_command(context, alias)
        assert command is not None, alias
        assert command.name in (alias, target)
    assert ALIASES["config"] == "configure"
    group = dmr_command("context")
    assert isinstance(group, click.Group)
    assert group.get_command(context, "list") is not None
    assert group.get_command(context, "remove") is not None
