"""The CLI answers at once: a command imports only what it uses, plugin commands come
from entry-point metadata, and every error is one `error: ...` line with exit 1."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from dmr.cli.main import COMMANDS, cli

from tests.fixtures.server import DmrServer

# Never in a quick command's process: engines, the server stack, registries, the Hub,
# and the libraries whose import alone costs more than the command may take.
HEAVY = (
    "torch", "llama_cpp", "vllm", "diffusers", "quart", "hypercorn", "oras",
    "huggingface_hub", "numpy", "httpx", "typer", "pydantic", "pluggy",
)  # fmt: skip

QUICK_COMMANDS = [
    ("ls",),
    ("ls", "--json"),
    ("ps",),
    ("status",),
    ("version",),
    ("df",),
    ("inspect", "nosuch/model:v1"),
    ("tag", "nosuch/model:v1", "other/name:v2"),
    ("rm", "nosuch/model:v1"),
    ("--help",),
]


def modules_after(env: dict[str, str], *args: str) -> tuple[int, set[str], str]:
    """Run `dmr ARGS` in a fresh interpreter; its exit code, every module it had
    imported when it ended, and its stderr."""
    script = textwrap.dedent(
        """
        import json, sys
        from dmr.cli.main import main
        sys.argv = ["dmr", *sys.argv[1:]]
        try:
            main()
        except SystemExit as end:
            code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
        else:
            code = 0
        print(json.dumps(sorted(sys.modules)), file=sys.stdout)
        sys.exit(code)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=60
    )
    modules = set(json.loads(done.stdout.strip().splitlines()[-1]))
    return done.returncode, modules, done.stderr


def test_the_command_table_names_every_command_by_its_own_name() -> None:
    for name, target in COMMANDS.items():
        command = cli.get_command(click.Context(cli), name)
        assert isinstance(command, click.Command), target
        assert command.name == name, (name, command.name)
    assert cli.get_command(click.Context(cli), "no-such-command") is None


@pytest.mark.parametrize("args", QUICK_COMMANDS, ids=" ".join)
def test_quick_commands_import_nothing_heavy(dmr_server: DmrServer, args: tuple[str, ...]) -> None:
    code, modules, stderr = modules_after(dmr_server.env, *args)
    assert "Traceback" not in stderr
    if args[0] in {"inspect", "tag", "rm"}:  # the model does not exist: a clean error
        assert code == 1 and stderr.startswith("error: ") and len(stderr.splitlines()) == 1
    else:
        assert code == 0, stderr
    loaded = {name.split(".")[0] for name in modules}
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_a_command_imports_only_its_own_module(dmr_server: DmrServer) -> None:
    _, modules, _ = modules_after(dmr_server.env, "ps")
    topic_modules = {target.split(":")[0] for target in COMMANDS.values()}
    assert topic_modules & modules == {"dmr.cli.runners"}


def plugin_distribution(root: Path) -> Path:
    """A throwaway installed distribution with three `dmr.cli` entry points: a command,
    a group, one that shadows `ls` and one that cannot be imported."""
    site = root / "site"
    (site / "dmr_hello_cli.py").parent.mkdir(parents=True)
    (site / "dmr_hello_cli.py").write_text(
        textwrap.dedent(
            '''
            import click

            @click.command()
            @click.argument("name")
            def hello(name):
                """Say hello."""
                click.echo(f"hello {name}")

            @click.group()
            def tools():
                """Some tools."""

            @tools.command()
            def ping():
                click.echo("pong")
            '''
        )
    )
    info = site / "dmr_hello-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dmr-hello\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[dmr.cli]\n"
        "hello = dmr_hello_cli:hello\n"
        "tools = dmr_hello_cli:tools\n"
        "ls = dmr_hello_cli:hello\n"
        "broken = dmr_hello_missing:command\n"
    )
    return site


def test_plugin_commands_from_entry_points(dmr_server: DmrServer, tmp_path: Path) -> None:
    env = {**dmr_server.env, "PYTHONPATH": str(plugin_distribution(tmp_path))}

    def dmr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dmr", *args], env=env, capture_output=True, text=True
        )

    said = dmr("hello", "world")
    assert said.returncode == 0 and said.stdout == "hello world\n", said.stderr
    assert dmr("tools", "ping").stdout == "pong\n"
    helped = dmr("--help")
    assert helped.returncode == 0
    assert "hello" in helped.stdout and "tools" in helped.stdout
    # The clash is refused by name, and the built-in `ls` stays the store's listing.
    assert "the plugin command 'ls'" in helped.stderr and "built-in" in helped.stderr
    assert "failed to load" in helped.stderr and "broken" not in helped.stdout
    broken = dmr("broken")
    assert broken.returncode != 0
    assert "'broken'" in broken.stderr and "failed to load" in broken.stderr
    listed = dmr("ls", "--json")
    assert listed.returncode == 0 and isinstance(json.loads(listed.stdout), list)
    assert listed.stderr == ""  # a built-in command never reads plugin metadata
    # `DMR_DISABLED_PLUGINS` takes a plugin command away by name.
    env["DMR_DISABLED_PLUGINS"] = "hello"
    assert dmr("hello", "x").returncode == 2


def test_errors_are_one_line_with_exit_code_1(dmr_server: DmrServer) -> None:
    for args in (("inspect", "../etc"), ("package", "--gguf", "/nonexistent.gguf", "a/b:c"),
                 ("rm", "nosuch:v1"), ("configure", "x", "--keep-alive", "soon")):  # fmt: skip
        done = dmr_server.cli(*args)
        assert done.returncode == 1, (args, done.stderr)
        assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1, done.stderr
    usage = dmr_server.cli("ls", "--no-such-option")
    assert usage.returncode == 2 and "No such option" in usage.stderr
