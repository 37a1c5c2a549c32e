"""Runner commands: `run`, `ps`, `unload`/`stop`, `configure`, `status`.

As `docker model` has them (docs/compatibility.md §8).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

from dmr.cli.client import connect
from dmr.cli.images import ImageOptions, is_image_model, write_images
from dmr.cli.main import app
from dmr.durations import parse_duration

__all__ = ["chat_stream", "fail"]

INTERACTIVE_HELP = """Commands:
  /bye                 leave the chat
  /?                   show this help
  /set system TEXT     set the system prompt (clears nothing else)
  /set num_ctx N       reload the model with a context of N tokens
  \"\"\"                 start or end a multi-line message"""


class CliError(Exception):
    """One line for the user, then exit 1."""


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _error_message(response: httpx.Response) -> str:
    try:
        body = json.loads(response.read() or b"{}")
    except ValueError:
        # An HTML error page (a route this server lacks) is no message for a terminal.
        return f"server answered {response.status_code} {response.reason_phrase}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return f"server answered {response.status_code}"


@contextmanager
def _server(timeout: float | None = 30.0) -> Iterator[httpx.Client]:
    """A client for the server; connection and HTTP errors become one clear line."""
    try:
        with connect(timeout=timeout) as client:
            yield client
    except httpx.ConnectError:
        fail("cannot reach the dmr server: is `dmr serve` running? (MODEL_RUNNER_HOST)")
    except CliError as error:
        fail(str(error))
    except httpx.HTTPError as error:
        fail(f"talking to the dmr server failed: {error}")


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise CliError(_error_message(response))
    return response


# --------------------------------------------------------------------------- status


@app.command()
def ps() -> None:
    """List running models."""
    with _server() as client:
        runners = _check(client.get("/engines/ps")).json()
    rows = [("MODEL NAME", "BACKEND", "MODE", "STATE", "LAST USED")]
    for item in runners:
        state = "loading" if item.get("loading") else "busy" if item.get("in_use") else "idle"
        rows.append(
            (
                str(item.get("model_name", "")),
                str(item.get("backend_name", "")),
                str(item.get("mode", "")),
                state,
                str(item.get("last_used", ""))[:19].replace("T", " "),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def _unload(models: list[str] | None, all_models: bool, backend: str | None) -> None:
    if not models and not all_models and not backend:
        fail("name the models to unload, or pass --all or --backend")
    body = {"all": all_models, "backend": backend or "", "models": models or []}
    with _server() as client:
        count = _check(client.post("/engines/unload", json=body)).json()["unloaded_runners"]
    typer.echo(f"Unloaded {count} model(s).")


ModelsArgument = Annotated[list[str] | None, typer.Argument(help="Models to unload.")]
AllOption = Annotated[bool, typer.Option("--all", help="Unload every model.")]
BackendOption = Annotated[str | None, typer.Option("--backend", help="Only this engine.")]


@app.command()
def unload(
    models: ModelsArgument = None, all_models: AllOption = False, backend: BackendOption = None
) -> None:
    """Unload running models."""
    _unload(models, all_models, backend)


@app.command()
def stop(
    models: ModelsArgument = None, all_models: AllOption = False, backend: BackendOption = None
) -> None:
    """Unload running models (alias of unload)."""
    _unload(models, all_models, backend)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Whether the server runs, and the state of each engine."""
    try:
        with connect(timeout=10) as client:
            client.get("/").raise_for_status()
            engines = _check(client.get("/engines/status")).json()
            hardware = client.get("/engines/hardware")
            devices = hardware.json().get("devices", []) if hardware.status_code == 200 else []
    except (httpx.HTTPError, CliError) as error:
        if as_json:
            typer.echo(json.dumps({"running": False, "error": str(error)}))
        else:
            typer.echo("Docker Model Runner is not running")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"running": True, "engines": engines, "devices": devices}, indent=2))
        return
    typer.echo("Docker Model Runner is running")
    typer.echo("")
    typer.echo("Status:")
    for name, line in engines.items():
        typer.echo(f"{name}: {line}")
    if devices:
        typer.echo("")
        typer.echo("Devices:")
        for device in devices:
            typer.echo(_device_line(device))


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


# --------------------------------------------------------------------------- configure


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def configure(
    model: Annotated[str, typer.Argument(help="Model to configure, or `show [MODEL]`.")],
    flags: Annotated[
        list[str] | None, typer.Argument(help="Runtime flags for the engine, after `--`.")
    ] = None,
    context_size: Annotated[
        int | None, typer.Option("--context-size", help="Context size in tokens.")
    ] = None,
    keep_alive: Annotated[
        str | None, typer.Option("--keep-alive", help="Idle time before unload: 5m, 0, -1.")
    ] = None,
    mode: Annotated[
        str | None, typer.Option("--mode", help="completion, embedding, reranking, ...")
    ] = None,
    draft_model: Annotated[
        str | None,
        typer.Option("--speculative-draft-model", help="Draft model for speculative decoding."),
    ] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="Engine to configure.")] = None,
) -> None:
    """Configure a model's runner (`dmr configure show [MODEL]` lists configurations)."""
    if model == "show":
        query = {"model": flags[0]} if flags else {}
        with _server() as client:
            configs = _check(client.get("/engines/_configure", params=query)).json()
        typer.echo(json.dumps(configs, indent=2))
        return
    body: dict[str, Any] = {"model": model}
    if context_size is not None:
        body["context-size"] = context_size
    if keep_alive is not None:
        try:
            parse_duration(keep_alive)
        except ValueError as error:
            fail(f"--keep-alive: {error}")
        body["keep_alive"] = keep_alive
    if mode:
        body["mode"] = mode
    if draft_model:
        body["speculative"] = {"draft_model": draft_model}
    if flags:
        body["runtime-flags"] = list(flags)
    path = f"/engines/{backend}/_configure" if backend else "/engines/_configure"
    with _server() as client:
        _check(client.post(path, json=body))
    typer.echo(f"Configured {model}.")


# --------------------------------------------------------------------------- run


def _describe_model(client: httpx.Client, model: str) -> dict[str, Any] | None:
    """The store's `GET /models/{name}` answer (None from a server without that API)."""
    found = client.get(f"/models/{model}")
    if found.status_code == 200 and found.headers.get("content-type", "").startswith(
        "application/json"
    ):
        body = found.json()
        return body if isinstance(body, dict) else None
    return None


def _ensure_model(client: httpx.Client, model: str) -> None:
    """Pull `model` when the store lacks it, as `docker model run` does."""
    found = client.get(f"/models/{model}")
    if found.status_code == 200:
        return
    if found.status_code != 404:
        _check(found)
    if not found.headers.get("content-type", "").startswith("application/json"):
        return  # a server without the models API: let the chat request answer
    typer.echo(f"Unable to find model '{model}' locally. Pulling from the server.", err=True)
    with client.stream("POST", "/models/create", json={"from": model}, timeout=None) as response:
        _check(response)
        for line in response.iter_lines():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("type") == "error":
                raise CliError(f"pulling {model} failed: {event.get('message')}")
            if event.get("type") == "success":
                typer.echo(str(event.get("message", "Model pulled successfully")), err=True)


def chat_stream(client: httpx.Client, body: dict[str, Any]) -> Iterator[str]:
    """The content pieces of a streamed chat completion, as they arrive."""
    with client.stream("POST", "/engines/v1/chat/completions", json=body, timeout=None) as answer:
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


def _answer(client: httpx.Client, model: str, messages: list[dict[str, str]]) -> str:
    pieces: list[str] = []
    completed = False
    try:
        for piece in chat_stream(client, {"model": model, "messages": messages, "stream": True}):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        completed = True
    finally:
        # End the answer's line; after a partial one, so that an error starts a line.
        if completed or pieces:
            sys.stdout.write("\n")
            sys.stdout.flush()
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


def _interactive(client: httpx.Client, model: str) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - gives input() line editing and history
    typer.echo("Interactive chat mode started. Type '/bye' to exit, '/?' for help.")
    system: str | None = None
    history: list[dict[str, str]] = []
    while True:
        message = _read_message()
        if message is None or message.strip() == "/bye":
            return
        text = message.strip()
        if not text:
            continue
        if text in ("/?", "/help"):
            typer.echo(INTERACTIVE_HELP)
            continue
        if text.startswith("/set system"):
            system = text.removeprefix("/set system").strip() or None
            typer.echo("Set system message." if system else "Cleared system message.")
            continue
        if text.startswith("/set num_ctx"):
            value = text.removeprefix("/set num_ctx").strip()
            if not value.isdigit() or int(value) <= 0:
                typer.echo("usage: /set num_ctx N (a positive number of tokens)")
                continue
            _check(
                client.post(
                    "/engines/_configure", json={"model": model, "context-size": int(value)}
                )
            )
            typer.echo(f"Set context size to {value}.")
            continue
        if text.startswith("/"):
            typer.echo(f"Unknown command {text.split()[0]!r}; type '/?' for help.")
            continue
        history.append({"role": "user", "content": message})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            reply = _answer(client, model, messages)
        except CliError as error:
            history.pop()
            typer.echo(f"error: {error}", err=True)
            continue
        history.append({"role": "assistant", "content": reply})


def _generate_images(client: httpx.Client, model: str, prompt: str, options: ImageOptions) -> None:
    answer = _check(client.post("/engines/v1/images/generations", json=options.body(model, prompt)))
    try:
        paths = write_images(answer.json(), model, options.output_dir)
    except (ValueError, OSError) as error:
        raise CliError(str(error)) from error
    for path in paths:
        typer.echo(str(path))


def _run_image_model(
    client: httpx.Client, model: str, prompt: str | None, detach: bool, options: ImageOptions
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
    typer.echo("Image generation mode: each prompt writes images. Type '/bye' to exit.")
    while (message := _read_message()) is not None and message.strip() != "/bye":
        if message.strip():
            try:
                _generate_images(client, model, message.strip(), options)
            except CliError as error:
                typer.echo(f"error: {error}", err=True)


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="Model to run, e.g. ai/smollm2.")],
    prompt: Annotated[str | None, typer.Argument(help="Prompt; without one, start a chat.")] = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Load the model in the background and exit.")
    ] = False,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", help="Image models: where to write the PNG files."),
    ] = None,
    size: Annotated[
        str | None, typer.Option("--size", help="Image models: WIDTHxHEIGHT, e.g. 512x512.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Image models: denoising steps.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", min=0, help="Image models: seed, same seed same image.")
    ] = None,
) -> None:
    """Run a model: answer PROMPT, or chat interactively (image models write PNG files)."""
    with _server(timeout=None) as client:
        _ensure_model(client, model)
        if is_image_model(_describe_model(client, model)):
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
            _answer(client, model, [{"role": "user", "content": prompt}])
            return
        _interactive(client, model)
