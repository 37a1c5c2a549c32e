"""`dmr launch [APP] [-- APP_ARGS...]`: start a chat app or coding agent already
pointed at this server, as `docker model launch` does (cmd/cli/commands/launch.go).

Each app gets the environment Docker Model Runner gives it, with this server's
address (the CLI's server, started when none answers):
- host apps, run from PATH with the app arguments after `--`:
  `opencode` (OpenAI `.../engines/v1`), `codex` (OpenAI `.../v1`), `claude`
  (Anthropic `.../anthropic`), `openclaw` (configured by commands, printed);
- web apps, which DMR runs as containers: `openwebui` runs as the `open-webui`
  executable when it is installed (`open-webui serve --port PORT`, with the OpenAI
  *and* Ollama base URLs, as dmr serves both), else, like `anythingllm`, with
  `docker run` where a `docker` command exists, DMR's image, volume and
  environment, the server reached from the container as `host.docker.internal`.
An app that is not installed gets the environment to set and how to install it,
and exit 1. `--dry-run` prints the command and environment; `--config` the
configuration only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import click

from dmr.cli.errors import fail

__all__ = ["APPS", "DUMMY_API_KEY", "launch"]

# DMR's placeholder key: clients insist on one, the server needs none (unless
# DMR_API_KEY is set, which is then given instead).
DUMMY_API_KEY = "sk-docker-model-runner"
OPENAI_SUFFIX = "/engines/v1"


def _api_key() -> str:
    return os.environ.get("DMR_API_KEY") or DUMMY_API_KEY


def _openai_env(suffix: str) -> Callable[[str], list[str]]:
    def env(base: str) -> list[str]:
        url = base + suffix
        key = _api_key()
        return [
            f"OPENAI_API_BASE={url}",
            f"OPENAI_BASE_URL={url}",
            f"OPENAI_API_BASE_URL={url}",
            f"OPENAI_API_KEY={key}",
            f"OPEN_AI_KEY={key}",  # AnythingLLM reads this one
        ]

    return env


def _openwebui_env(base: str) -> list[str]:
    # DMR gives the OpenAI connection only; dmr serves Ollama's API too, Open WebUI's
    # other connection, at the server's root.
    return [*_openai_env(OPENAI_SUFFIX)(base), "WEBUI_AUTH=false", f"OLLAMA_BASE_URL={base}"]


def _anythingllm_env(base: str) -> list[str]:
    return [
        "STORAGE_DIR=/app/server/storage",
        "LLM_PROVIDER=docker-model-runner",
        f"DOCKER_MODEL_RUNNER_BASE_PATH={base}",
    ]


def _anthropic_env(base: str) -> list[str]:
    return [f"ANTHROPIC_BASE_URL={base}/anthropic", f"ANTHROPIC_API_KEY={_api_key()}"]


def _openclaw_instructions(base: str) -> list[str]:
    url = base + OPENAI_SUFFIX
    return [
        f'openclaw config set models.providers.docker-model-runner.baseUrl "{url}"',
        "openclaw config set models.providers.docker-model-runner.api openai-completions",
        f"openclaw config set models.providers.docker-model-runner.apiKey {_api_key()}",
    ]


@dataclass(frozen=True)
class App:
    """One app `launch` knows: how it is run, its environment, how to get it."""

    description: str
    install: str
    env: Callable[[str], list[str]] | None = None
    instructions: Callable[[str], list[str]] | None = None
    # Web apps: DMR's container, and dmr's way without one.
    image: str = ""
    container_port: int = 0
    default_port: int = 0
    docker_args: tuple[str, ...] = ()
    executable: str = ""  # the host command, when it differs from the app's name
    serve_args: Callable[[int], list[str]] = field(default=lambda port: [])


APPS: dict[str, App] = {
    "anythingllm": App(
        "RAG platform with Docker Model Runner provider",
        "its container (docker) or desktop app: https://anythingllm.com/download",
        env=_anythingllm_env,
        image="mintplexlabs/anythingllm:latest",
        container_port=3001,
        default_port=3001,
        docker_args=("-v", "anythingllm_storage:/app/server/storage"),
    ),
    "claude": App(
        "Claude Code AI assistant",
        "npm install -g @anthropic-ai/claude-code",
        env=_anthropic_env,
    ),
    "codex": App("Codex CLI", "npm install -g @openai/codex", env=_openai_env("/v1")),
    "openclaw": App(
        "Open Claw AI assistant", "npm install -g openclaw", instructions=_openclaw_instructions
    ),
    "opencode": App(
        "Open Code AI code editor",
        "npm install -g opencode-ai (or: curl -fsSL https://opencode.ai/install | bash)",
        env=_openai_env(OPENAI_SUFFIX),
    ),
    "openwebui": App(
        "Open WebUI for models",
        "pip install open-webui (a separate environment is wise: it brings torch)",
        env=_openwebui_env,
        image="ghcr.io/open-webui/open-webui:latest",
        container_port=8080,
        default_port=3000,
        docker_args=("-v", "openwebui_data:/app/backend/data"),
        executable="open-webui",
        serve_args=lambda port: ["serve", "--port", str(port)],
    ),
}


def _server_base() -> str:
    """This server's base URL (`http://127.0.0.1:12434`), started when none answers."""
    from dmr.cli.autostart import ServerUnavailableError, ensure_server

    try:
        address = ensure_server().address
    except ServerUnavailableError as error:
        fail(str(error))
    if address.socket_path is not None:
        fail(
            "the dmr server listens on a unix socket only, which apps cannot be given;"
            " start it with a TCP port (MODEL_RUNNER_PORT)"
        )
    return address.base_url


def _container_base(base: str) -> str:
    """The server as a container reaches it: loopback names become host.docker.internal."""
    parts = urlsplit(base)
    if parts.hostname in ("127.0.0.1", "localhost", "::1"):
        netloc = f"host.docker.internal:{parts.port}" if parts.port else "host.docker.internal"
        return urlunsplit(parts._replace(netloc=netloc))
    return base


def _list_apps() -> None:
    click.echo("Supported apps:\n")
    for name in sorted(APPS):
        app = APPS[name]
        missing = ""
        if not app.image and shutil.which(app.executable or name) is None:
            missing = " (not installed)"
        click.echo(f"  {name:<15} {app.description}{missing}")
    click.echo("\nUsage: dmr launch [APP] [-- APP_ARGS...]")


def _docker_command(app: App, base: str, image: str, port: int, detach: bool) -> list[str]:
    assert app.env is not None
    command = ["docker", "run", "--rm", *(["-d"] if detach else [])]
    command += ["-p", f"{port}:{app.container_port}", *app.docker_args]
    # Linux's docker has no host.docker.internal unless told (Docker Desktop has it).
    command += ["--add-host", "host.docker.internal:host-gateway"]
    for item in app.env(_container_base(base)):
        command += ["-e", item]
    return [*command, image or app.image]


def _run(command: list[str], env: list[str]) -> None:
    """Run the app in the foreground with this terminal; its exit code is ours."""
    full_env = {**os.environ, **dict(item.split("=", 1) for item in env)}
    try:
        done = subprocess.run(command, env=full_env, check=False)
    except OSError as error:
        fail(f"failed to run {' '.join(command)}: {error}")
    if done.returncode != 0:
        sys.exit(done.returncode)


def _print_config(name: str, app: App, base: str, image: str, port: int) -> None:
    if app.image:
        click.echo(f"Configuration for {name} (web app):")
        click.echo(f"  Image:          {image or app.image}")
        click.echo(f"  Container port: {app.container_port}")
        click.echo(f"  Host port:      {port}")
        if app.executable:
            click.echo(f"  Host command:   {app.executable} {' '.join(app.serve_args(port))}")
            click.echo("  Environment (host command):")
            for item in app.env(base) if app.env else []:
                click.echo(f"    {item}")
        click.echo("  Environment (container):")
        for item in app.env(_container_base(base)) if app.env else []:
            click.echo(f"    {item}")
        return
    click.echo(f"Configuration for {name} (host app):")
    if app.env is not None:
        click.echo("  Environment:")
        for item in app.env(base):
            click.echo(f"    {item}")
    if app.instructions is not None:
        click.echo("  Manual configuration:")
        for line in app.instructions(base):
            click.echo(f"    {line}")


def _not_installed(name: str, app: App, env: list[str], also: str = "") -> None:
    click.echo(f"{app.executable or name!r} executable not found in PATH.", err=True)
    if env:
        click.echo("Configure your app to use:", err=True)
        for item in env:
            click.echo(f"  {item}", err=True)
    fail(f"{name} not found; install it ({app.install}){also} and run `dmr launch {name}` again")


def _launch_web_app(
    name: str, app: App, base: str, image: str, port: int, detach: bool, extra: list[str],
    dry_run: bool,
) -> None:  # fmt: skip
    host_command = app.executable and shutil.which(app.executable) and not image
    if host_command:
        assert app.env is not None
        env = app.env(base)
        command = [app.executable, *app.serve_args(port), *extra]
        if dry_run:
            click.echo(f"Would run: {' '.join(command)}")
            for item in env:
                click.echo(f"  {item}")
            return
        if detach:
            fail(f"--detach runs a container; {app.executable} runs in the foreground here")
        _run(command, env)
        return
    command = [*_docker_command(app, base, image, port, detach), *extra]
    if dry_run:
        click.echo(f"Would run: {' '.join(command)}")
        return
    if shutil.which("docker") is None:
        env = app.env(base) if app.env else []
        _not_installed(name, app, env, f", or docker to run its image {app.image}")
    if urlsplit(base).hostname in ("127.0.0.1", "localhost", "::1"):
        click.echo(
            "note: the dmr server listens on loopback only; a container reaches it once it"
            " listens on the docker bridge too (`dmr restart-runner --host 0.0.0.0` with"
            " DMR_API_KEY set)",
            err=True,
        )
    _run(command, [])


def _write_opencode_config(base: str, model: str) -> None:
    """As DMR's launch does for `--model`: opencode's provider `dmr` in
    ~/.config/opencode/opencode.json (other settings kept), with MODEL listed."""
    import json
    from pathlib import Path

    path = Path.home() / ".config" / "opencode" / "opencode.json"
    config: dict[str, object] = {}
    try:
        loaded = json.loads(path.read_text())
        if isinstance(loaded, dict):
            config = loaded
    except (OSError, ValueError):
        pass  # missing or unreadable: start afresh, as DMR does
    config["$schema"] = "https://opencode.ai/config.json"
    providers = config.get("provider")
    providers = providers if isinstance(providers, dict) else {}
    provider = providers.get("dmr")
    provider = provider if isinstance(provider, dict) else {}
    provider.setdefault("npm", "@ai-sdk/openai-compatible")
    provider.setdefault("name", "Docker Model Runner (local)")
    options = provider.get("options")
    options = options if isinstance(options, dict) else {}
    options["baseURL"] = f"{base}/v1"
    provider["options"] = options
    models = provider.get("models")
    models = models if isinstance(models, dict) else {}
    models[model] = {"name": model, "_launch": True}
    provider["models"] = models
    providers["dmr"] = provider
    config["provider"] = providers
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")
    except OSError as error:
        fail(f"failed to write opencode config {path}: {error}")
    click.echo(f"Wrote provider dmr (model {model}) to {path}", err=True)


@click.command()
@click.argument("app", required=False)
@click.argument("app_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--port", type=click.IntRange(1, 65535), help="Host port to expose (web UIs).")
@click.option("--image", default="", help="Override the container image of a web app.")
@click.option("--detach", is_flag=True, help="Run a containerized app in the background.")
@click.option("--dry-run", is_flag=True, help="Print what would run, without running it.")
@click.option("--config", "config_only", is_flag=True, help="Print the configuration only.")
@click.option("--model", default="", help="Model to use (opencode: written to its config).")
def launch(
    app: str | None,
    app_args: tuple[str, ...],
    port: int | None,
    image: str,
    detach: bool,
    dry_run: bool,
    config_only: bool,
    model: str,
) -> None:
    """Launch an app configured to use this server; without APP, list the apps.

    Apps: anythingllm, claude, codex, openclaw, opencode, openwebui. Arguments for
    the app go after `--`: `dmr launch claude -- --help`.
    """
    if app is None:
        _list_apps()
        return
    name = app.lower()
    chosen = APPS.get(name)
    if chosen is None:
        fail(f"unsupported app {app!r} (supported: {', '.join(sorted(APPS))})")
    extra = list(app_args)
    if extra and "--" not in sys.argv[1:]:  # as DMR: the app's own arguments go after `--`
        fail(
            f"unexpected arguments: {' '.join(extra)}\nUse '--' to pass extra arguments to the app"
        )
    base = _server_base()
    web_port = port or chosen.default_port
    if config_only:
        _print_config(name, chosen, base, image, web_port)
        return
    if chosen.image:
        _launch_web_app(name, chosen, base, image, web_port, detach, extra, dry_run)
        return
    if name == "opencode" and model and not dry_run:
        _write_opencode_config(base, model)
    env = chosen.env(base) if chosen.env else []
    if chosen.instructions is not None:
        click.echo(f"Configure {name} to use dmr:")
        click.echo(f"  Base URL: {base}{OPENAI_SUFFIX}")
        click.echo("  API type: openai-completions")
        click.echo(f"  API key:  {_api_key()}")
        click.echo("\nExample:")
        for line in chosen.instructions(base):
            click.echo(f"  {line}")
    if dry_run:
        click.echo(f"Would run: {' '.join([name, *extra])}")
        for item in env:
            click.echo(f"  {item}")
        return
    if shutil.which(name) is None:
        _not_installed(name, chosen, env)
    _run([name, *extra], env)
