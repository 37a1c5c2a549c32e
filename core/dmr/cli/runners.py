"""Runner commands: `run`, `ps`, `unload`/`stop`, `configure`, `status`.

As `docker model` has them (docs/compatibility.md §8).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from dmr.cli.answer_style import COLOR_MODES, AnswerStyle, use_markdown
from dmr.cli.autostart import ServerAddress, ensure_server
from dmr.cli.chat_images import image_data_url, images_in_prompt, user_message
from dmr.cli.client import connect
from dmr.cli.errors import CliError, error_message, fail, report
from dmr.cli.http import HTTPError, ServerClient, ServerResponse, TransportError, ndjson_events
from dmr.cli.images import ImageOptions, is_image_model, write_images
from dmr.durations import parse_duration

__all__ = [
    "chat_stream",
    "human_duration",
    "openai_endpoint",
    "ps",
    "run",
    "status",
    "stop",
    "unload",
    "until",
]

INTERACTIVE_HELP = """Commands:
  /bye                 leave the chat
  /?                   show this help
  /set system TEXT     set the system prompt (clears nothing else)
  /set num_ctx N       reload the model with a context of N tokens
  \"\"\"                 start or end a multi-line message
A path to an image file (.png, .jpg, .jpeg, .gif, .webp) in a message attaches it."""


@contextmanager
def _server(timeout: float | None = 30.0) -> Iterator[ServerClient]:
    """A client for the server; connection and HTTP errors become one clear line."""
    try:
        with connect(timeout=timeout) as client:
            yield client
    except TransportError as error:
        fail(str(error))
    except CliError as error:
        fail(str(error))
    except HTTPError as error:
        fail(f"talking to the dmr server failed: {error}")


def _check(response: ServerResponse) -> ServerResponse:
    if response.status_code >= 400:
        raise CliError(error_message(response))
    return response


# --------------------------------------------------------------------------- status


def human_duration(seconds: float) -> str:
    """Docker's `units.HumanDuration`, which `docker model ps` prints: "4 minutes"."""
    whole = int(seconds)
    if whole < 1:
        return "Less than a second"
    if whole == 1:
        return "1 second"
    if whole < 60:
        return f"{whole} seconds"
    minutes = whole // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def until(item: dict[str, Any], now: float | None = None) -> str:
    """`docker model ps`'s UNTIL for one `/engines/ps` item: when its keep-alive ends,
    worded as Docker Model Runner's CLI words it ("Loading...", "Forever",
    "4 minutes from now", "Expiring")."""
    from datetime import datetime

    if item.get("loading"):
        return "Loading..."
    try:
        keep_alive = parse_duration(item.get("keep_alive") or "5m")
    except (TypeError, ValueError):
        return ""
    if keep_alive < 0:
        return "Forever"
    try:
        last_used: float | None = datetime.fromisoformat(str(item.get("last_used"))).timestamp()
    except ValueError:
        last_used = None
    if item.get("in_use") or last_used is None:
        return f"{human_duration(keep_alive)} from now"
    remaining = keep_alive - ((time.time() if now is None else now) - last_used)
    return "Expiring" if remaining <= 0 else f"{human_duration(remaining)} from now"


@click.command()
def ps() -> None:
    """List running models; UNTIL is when an idle one unloads (its keep-alive)."""
    with _server() as client:
        runners = _check(client.get("/engines/ps")).json()
        # Older servers (and Docker Model Runner) have no queue route: nothing waits.
        queue_answer = client.get("/engines/queue")
        queued = queue_answer.json() if queue_answer.status_code == 200 else []
    rows: list[tuple[str, ...]] = [
        ("MODEL NAME", "BACKEND", "MODE", "STATE", "WAITING", "LAST USED", "UNTIL")
    ]
    now = time.time()
    loaded = set()
    for item in runners:
        state = "loading" if item.get("loading") else "busy" if item.get("in_use") else "idle"
        loaded.add((item.get("backend_name"), item.get("model_id"), item.get("mode")))
        rows.append(
            (
                str(item.get("model_name", "")),
                str(item.get("backend_name", "")),
                str(item.get("mode", "")),
                state,
                str(item.get("waiting", 0)),
                str(item.get("last_used", ""))[:19].replace("T", " "),
                until(item, now),
            )
        )
    for item in queued:  # models whose requests wait for memory to load them
        if (item.get("backend_name"), item.get("model_id"), item.get("mode")) in loaded:
            continue
        rows.append(
            (
                str(item.get("model_name", "")),
                str(item.get("backend_name", "")),
                str(item.get("mode", "")),
                "waiting",
                str(item.get("waiting", 0)),
                f"waited {float(item.get('oldest_wait_seconds', 0)):.0f}s",
                "",
            )
        )
    if any(item.get("node") for item in runners):
        # On a cluster (dmr serve --ray-address): the node each runner is on.
        nodes = ["NODE"] + [str(item.get("device") or "") for item in runners]
        rows = [(*row, nodes[i] if i < len(nodes) else "") for i, row in enumerate(rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def _unload(models: list[str] | None, all_models: bool, backend: str | None) -> None:
    if not models and not all_models and not backend:
        fail("name the models to unload, or pass --all or --backend")
    body = {"all": all_models, "backend": backend or "", "models": models or []}
    with _server() as client:
        answer = _check(client.post("/engines/unload", json=body)).json()
    click.echo(f"Unloaded {answer['unloaded_runners']} model(s).")
    cancelled = answer.get("cancelled_requests", 0)
    if cancelled:
        click.echo(f"Cancelled {cancelled} request(s) in flight; their clients got an error.")


def _unload_options(function: Any) -> Any:
    function = click.option("--backend", help="Only this engine.")(function)
    function = click.option("--all", "all_models", is_flag=True, help="Unload every model.")(
        function
    )
    return click.argument("models", nargs=-1)(function)


@click.command()
@_unload_options
def unload(models: tuple[str, ...], all_models: bool, backend: str | None) -> None:
    """Unload running MODELS."""
    _unload(list(models), all_models, backend)


@click.command()
@_unload_options
def stop(models: tuple[str, ...], all_models: bool, backend: str | None) -> None:
    """Unload running MODELS (alias of unload)."""
    _unload(list(models), all_models, backend)


def openai_endpoint(address: ServerAddress) -> str:
    """The OpenAI base URL clients of this server use, `http://127.0.0.1:12434/engines/v1/`;
    "" for a server on a unix socket, which no HTTP client can be given a URL for."""
    return "" if address.socket_path is not None else f"{address.base_url}/engines/v1/"


def _status_json(
    address: ServerAddress, engines: Any, devices: Any, probe_errors: Any, cluster: Any = None
) -> dict[str, Any]:
    """`docker model status --json`'s fields, which Docker Compose reads (`endpoint`),
    then dmr's own (`engines`, `devices`)."""
    endpoint = openai_endpoint(address)
    answer: dict[str, Any] = {
        "running": True,
        "backends": engines,
        "kind": "dmr",
        "endpoint": endpoint,
        # DMR's URL for the host when `endpoint` is the one for containers: the same here.
        "endpointHost": endpoint,
    }
    if address.socket_path is not None:
        answer["socket"] = str(address.socket_path)
    answer.update(engines=engines, devices=devices, probe_errors=probe_errors)
    if cluster is not None:
        answer["cluster"] = cluster
    return answer


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """Whether the server runs, and the state of each engine."""
    try:
        address = ensure_server().address  # for the endpoint; connect() finds the same one
        with connect(timeout=10) as client:
            client.get("/").raise_for_status()
            engines = _check(client.get("/engines/status")).json()
            hardware = client.get("/engines/hardware")
            described = hardware.json() if hardware.status_code == 200 else {}
            devices = described.get("devices", [])
            probe_errors = described.get("probe_errors", [])
            cluster = described.get("cluster")
    except (HTTPError, CliError) as error:
        if as_json:
            click.echo(json.dumps({"running": False, "error": str(error)}))
        else:
            click.echo("Docker Model Runner is not running")
        raise SystemExit(1) from None
    if as_json:
        answer = _status_json(address, engines, devices, probe_errors, cluster)
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo("Docker Model Runner is running")
    click.echo("")
    click.echo("Status:")
    for name, line in engines.items():
        click.echo(f"{name}: {line}")
    if devices:
        click.echo("")
        click.echo("Devices:")
        for device in devices:
            click.echo(_device_line(device))
    if probe_errors:
        click.echo("")
        click.echo("Hardware probes that failed (their devices are not used):")
        for failure in probe_errors:
            click.echo(f"{failure.get('plugin')}: {failure.get('error')}")


def _device_line(device: dict[str, Any]) -> str:
    """`cuda:0 NVIDIA H100 80GB HBM3 — 79.1 GiB free of 79.6 GiB — engines: llama.cpp, vllm`."""

    def gib(value: Any) -> str:
        return f"{int(value or 0) / 1024**3:.1f} GiB"

    name = f"{device.get('kind')}:{device.get('index')} {device.get('name')}"
    if device.get("cores"):
        name += f" ({device['cores']} cores)"
    memory = f"{gib(device.get('free_memory'))} free of {gib(device.get('total_memory'))}"
    engines = ", ".join(device.get("engines") or []) or "none"
    return f"{name} — {memory} — engines: {engines}"


# --------------------------------------------------------------------------- run


def _describe_model(client: ServerClient, model: str) -> dict[str, Any] | None:
    """The store's `GET /models/{name}` answer (None from a server without that API)."""
    found = client.get(f"/models/{model}")
    if found.status_code == 200 and found.headers.get("content-type", "").startswith(
        "application/json"
    ):
        body = found.json()
        return body if isinstance(body, dict) else None
    return None


def _ensure_model(client: ServerClient, model: str) -> None:
    """Pull `model` when the store lacks it, as `docker model run` does."""
    found = client.get(f"/models/{model}")
    if found.status_code == 200:
        return
    if found.status_code != 404:
        _check(found)
    if not found.headers.get("content-type", "").startswith("application/json"):
        return  # a server without the models API: let the chat request answer
    click.echo(f"Unable to find model '{model}' locally. Pulling from the server.", err=True)
    with client.stream("POST", "/models/create", json={"from": model}, timeout=None) as response:
        _check(response)
        for event in ndjson_events(response.iter_lines()):
            if event.get("type") == "error":
                raise CliError(f"pulling {model} failed: {event.get('message')}")
            if event.get("type") == "success":
                click.echo(str(event.get("message", "Model pulled successfully")), err=True)


def chat_stream(
    client: ServerClient, body: dict[str, Any], path: str = AnswerStyle.chat_path
) -> Iterator[str]:
    """The content pieces of a streamed chat completion, as they arrive."""
    with client.stream("POST", path, json=body, timeout=None) as answer:
        _check(answer)
        for line in answer.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if "error" in event:
                error = event["error"]
                message = error.get("message") if isinstance(error, dict) else error
                raise CliError(str(message))
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece


def _answer(
    client: ServerClient,
    model: str,
    messages: list[dict[str, Any]],
    style: AnswerStyle = AnswerStyle(),  # noqa: B008 - frozen, so one shared default is safe
) -> str:
    pieces: list[str] = []
    completed = False
    body = {"model": model, "messages": messages, "stream": True}
    try:
        for piece in chat_stream(client, body, style.chat_path):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        completed = True
    finally:
        # End the answer's line; after a partial one, so that an error starts a line.
        if completed or pieces:
            sys.stdout.write("\n")
            sys.stdout.flush()
    style.render("".join(pieces))
    return "".join(pieces)


def _read_message() -> str | None:
    """One user message; `\"\"\"` opens and closes a multi-line one. None at end of input."""
    try:
        line = input("> ")
    except EOFError:
        return None
    if not line.lstrip().startswith('"""'):
        return line
    first = line.lstrip()[3:]
    if first.rstrip().endswith('"""') and first.strip():
        return first.rstrip()[:-3]
    lines = [first] if first else []
    while True:
        try:
            more = input(". ")
        except EOFError:
            return "\n".join(lines)
        if more.rstrip().endswith('"""'):
            lines.append(more.rstrip()[:-3])
            return "\n".join(line for line in lines if line or len(lines) > 1).strip("\n")
        lines.append(more)


def _prompt_message(prompt: str, image_urls: list[str], *, announce: bool) -> dict[str, Any]:
    """The user message for `prompt`: the `--image` files, then the image files the
    prompt names (their paths taken out of the text), as `docker model run` does."""
    text, paths = images_in_prompt(prompt)
    urls = list(image_urls)
    for path in paths:
        urls.append(image_data_url(path))
        if announce:
            click.echo(f"Added image '{path}'", err=True)
    return user_message(text, urls)


def _interactive(
    client: ServerClient,
    model: str,
    image_urls: list[str],
    style: AnswerStyle = AnswerStyle(),  # noqa: B008 - frozen, so one shared default is safe
) -> None:
    """Chat turn by turn; `image_urls` (from `--image`) go with the first message."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - gives input() line editing and history
    click.echo("Interactive chat mode started. Type '/bye' to exit, '/?' for help.")
    system: str | None = None
    history: list[dict[str, Any]] = []
    pending = list(image_urls)
    while True:
        message = _read_message()
        if message is None or message.strip() == "/bye":
            return
        text = message.strip()
        if not text:
            continue
        if text in ("/?", "/help"):
            click.echo(INTERACTIVE_HELP)
            continue
        if text.startswith("/set system"):
            system = text.removeprefix("/set system").strip() or None
            click.echo("Set system message." if system else "Cleared system message.")
            continue
        if text.startswith("/set num_ctx"):
            value = text.removeprefix("/set num_ctx").strip()
            if not value.isdigit() or int(value) <= 0:
                click.echo("usage: /set num_ctx N (a positive number of tokens)")
                continue
            _check(
                client.post(
                    "/engines/_configure", json={"model": model, "context-size": int(value)}
                )
            )
            click.echo(f"Set context size to {value}.")
            continue
        if text.startswith("/") and not images_in_prompt(text)[1]:
            click.echo(f"Unknown command {text.split()[0]!r}; type '/?' for help.")
            continue
        try:
            history.append(_prompt_message(message, pending, announce=True))
        except CliError as error:  # an image that cannot be read: say so, send nothing
            report(str(error))
            continue
        pending = []  # the first message only, even if refused: a text model refuses each turn
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            reply = _answer(client, model, messages, style)
        except CliError as error:
            history.pop()
            report(str(error))
            continue
        history.append({"role": "assistant", "content": reply})


def _generate_images(client: ServerClient, model: str, prompt: str, options: ImageOptions) -> None:
    answer = _check(client.post("/engines/v1/images/generations", json=options.body(model, prompt)))
    try:
        paths = write_images(answer.json(), model, options.output_dir)
    except (ValueError, OSError) as error:
        raise CliError(str(error)) from error
    for path in paths:
        click.echo(str(path))


def _run_image_model(
    client: ServerClient, model: str, prompt: str | None, detach: bool, options: ImageOptions
) -> None:
    """Image models answer a prompt with PNG files (their paths on stdout), not text."""
    if detach:
        _check(
            client.post(
                "/engines/v1/images/generations",
                json={"model": model, "prompt": ""},
                headers={"X-Preload-Only": "true"},
            )
        )
        return
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip() or None
    if prompt is not None:
        _generate_images(client, model, prompt, options)
        return
    click.echo("Image generation mode: each prompt writes images. Type '/bye' to exit.")
    while (message := _read_message()) is not None and message.strip() != "/bye":
        if message.strip():
            try:
                _generate_images(client, model, message.strip(), options)
            except CliError as error:
                report(str(error))


@click.command()
@click.argument("model")
@click.argument("prompt_words", metavar="[PROMPT]...", nargs=-1)
@click.option("-d", "--detach", is_flag=True, help="Load the model in the background and exit.")
@click.option(
    "--output-dir", type=click.Path(path_type=Path),
    help="Image models: where to write the PNG files.",
)  # fmt: skip
@click.option("--size", help="Image models: WIDTHxHEIGHT, e.g. 512x512.")
@click.option("--steps", type=click.IntRange(min=1), help="Image models: denoising steps.")
@click.option(
    "--seed", type=click.IntRange(min=0), help="Image models: seed, same seed same image."
)
@click.option(
    "--image", "images", multiple=True, type=click.Path(path_type=Path), metavar="PATH",
    help="Vision models: an image file (PNG, JPEG, GIF, WebP) sent with the prompt; repeatable.",
)  # fmt: skip
@click.option("--debug", is_flag=True, help="Say on stderr what runs, with which prompt, where.")
@click.option(
    "--color", type=click.Choice(COLOR_MODES), default="no", show_default=True,
    help="Show the answer rendered as Markdown in colour (auto: on a terminal).",
)  # fmt: skip
@click.option(
    "--openaiurl", metavar="URL",
    help="Chat with this OpenAI-compatible endpoint (URL/chat/completions) instead.",
)  # fmt: skip
@click.option(
    "--websearch", is_flag=True, hidden=True,
    help="Docker Model Runner's web search tool: refused, dmr has none.",
)  # fmt: skip
def run(
    model: str,
    prompt_words: tuple[str, ...],
    detach: bool,
    output_dir: Path | None,
    size: str | None,
    steps: int | None,
    seed: int | None,
    images: tuple[Path, ...],
    debug: bool,
    color: str,
    openaiurl: str | None,
    websearch: bool,
) -> None:
    """Run MODEL (e.g. ai/smollm2): answer PROMPT, or chat interactively without one.

    The words of PROMPT are joined with spaces, as `docker model run` and `ollama run`
    do: `dmr run ai/smollm2 hello world` asks "hello world". Image models write PNG
    files and print their paths. For vision models, `--image` and image file paths
    named in a prompt send those images with it.
    """
    prompt = " ".join(prompt_words) if prompt_words else None
    if websearch:
        fail("--websearch: dmr has no web search tool (Docker Model Runner's calls DuckDuckGo)")
    if images and detach:
        fail("--image needs a prompt to go with; --detach sends none")
    try:  # read before anything starts: a wrong path fails at once
        image_urls = [image_data_url(path) for path in images]
    except CliError as error:
        fail(str(error))
    style = AnswerStyle(markdown=use_markdown(color), debug=debug)
    running = f"Running model {model}" + (f" with prompt {prompt}" if prompt else "")
    if openaiurl is not None:
        _run_elsewhere(openaiurl, model, prompt, detach, image_urls, style, running)
        return
    with _server(timeout=None) as client:
        style.note(f"{running} (dmr server at {client.base_url})")
        _ensure_model(client, model)
        if is_image_model(_describe_model(client, model)):
            if image_urls:
                raise CliError(f"{model} generates images; --image is for vision chat models")
            options = ImageOptions(
                output_dir=output_dir or Path.cwd(), size=size, steps=steps, seed=seed
            )
            _run_image_model(client, model, prompt, detach, options)
            return
        if detach:
            _check(
                client.post(
                    "/engines/v1/chat/completions",
                    json={"model": model, "messages": []},
                    headers={"X-Preload-Only": "true"},
                )
            )
            return
        if prompt is None and not sys.stdin.isatty():
            prompt = sys.stdin.read().strip() or None
        if prompt is not None:
            _answer(client, model, [_prompt_message(prompt, image_urls, announce=False)], style)
            return
        _interactive(client, model, image_urls, style)


def _run_elsewhere(
    url: str,
    model: str,
    prompt: str | None,
    detach: bool,
    image_urls: list[str],
    style: AnswerStyle,
    running: str,
) -> None:
    """`run --openaiurl`: the chat goes to another OpenAI-compatible server as it is."""
    from urllib.parse import urlsplit

    if detach:
        fail("--detach flag cannot be used with --openaiurl flag")  # docker model's words
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        fail(f"invalid OpenAI URL {url!r}: give http(s)://HOST[:PORT][/PATH], e.g. .../v1")
    elsewhere = dataclasses.replace(style, chat_path="/chat/completions")
    elsewhere.note(f"{running} (OpenAI endpoint {url.rstrip('/')}/chat/completions)")
    try:
        with ServerClient(url, timeout=None) as client:
            if prompt is None and not sys.stdin.isatty():
                prompt = sys.stdin.read().strip() or None
            if prompt is not None:
                message = _prompt_message(prompt, image_urls, announce=False)
                _answer(client, model, [message], elsewhere)
                return
            _interactive(client, model, image_urls, elsewhere)
    except (TransportError, CliError) as error:
        fail(str(error))
    except HTTPError as error:
        fail(f"talking to {url} failed: {error}")
