"""Model commands: `list/ls`, `rm`, `inspect`, `show`, `tag`, `package`, `df`, `purge`.

Like `docker model`, every command goes through the server's HTTP API; `package`
builds the artifact here and uploads it as a streamed tarball.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table

from dmr.cli.client import connect
from dmr.cli.main import app, console, err_console

__all__ = ["df", "inspect", "list_models", "package", "purge", "rm", "show", "tag"]


def _fail(message: str) -> NoReturn:
    err_console.print(f"[red]Error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _error_message(response: httpx.Response) -> str:
    text = response.text.strip()
    try:
        body = json.loads(text)
    except ValueError:
        if not text or text.startswith("<"):  # an HTML error page: say it in one line
            return f"HTTP {response.status_code} {response.reason_phrase}"
        return text
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error)
        return str(error)
    return text


def _path(name: str) -> str:
    """A model name as a URL path, checked here: a client-side URL normaliser would
    turn `../x` into another path before the server could refuse it."""
    from dmr.reference import InvalidReferenceError, is_model_id, parse_reference

    if not is_model_id(name):
        try:
            parse_reference(name)
        except InvalidReferenceError as error:
            _fail(str(error))
    return quote(name, safe="/:@")


def _request(method: str, path: str, **kwargs: Any) -> Any:
    """One API call: the JSON answer, or a clear error and exit code 1."""
    try:
        with connect(timeout=kwargs.pop("timeout", 300.0)) as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as error:
        _fail(f"cannot reach the dmr server: {error} (start it with `dmr serve`)")
    if response.status_code >= 400:
        _fail(_error_message(response))
    return response.json() if response.content else None


def _print_json(value: Any) -> None:
    # print(), not rich: scripts parse this, so no wrapping or highlighting.
    print(json.dumps(value, indent=2))


def _print_table(table: Table) -> None:
    # Piped output is 80 columns to rich; names must never be cut for `grep`/scripts.
    if console.is_terminal:
        console.print(table)
    else:
        Console(width=250).print(table)


def _ago(created: int) -> str:
    if not created:
        return ""
    seconds = max(0, int(datetime.now(UTC).timestamp()) - created)
    for unit, size in (("year", 31536000), ("month", 2592000), ("day", 86400), ("hour", 3600)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    minutes = seconds // 60
    return f"{minutes} minute{'s' if minutes != 1 else ''} ago" if minutes else "just now"


def _short(model_id: str) -> str:
    return model_id.removeprefix("sha256:")[:12]


@app.command(name="list")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="The server's JSON"),
    openai: bool = typer.Option(False, "--openai", help="OpenAI's /v1/models shape"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only model IDs"),
) -> None:
    """List the models in the store."""
    models: list[dict[str, Any]] = _request("GET", "/models")
    if as_json:
        _print_json(models)
        return
    if openai:
        data = [
            {"id": tag, "object": "model", "created": m.get("created", 0), "owned_by": "docker"}
            for m in models
            for tag in (m.get("tags") or [_short(m["id"])])
        ]
        _print_json({"object": "list", "data": data})
        return
    if quiet:
        for model in models:
            print(_short(model["id"]))
        return
    table = Table("MODEL NAME", "PARAMETERS", "QUANTIZATION", "ARCHITECTURE", "MODEL ID",
                  "CREATED", "SIZE", box=None)  # fmt: skip
    for model in models:
        config = model.get("config") or {}
        for name in model.get("tags") or ["<none>"]:
            table.add_row(
                name,
                str(config.get("parameters", "")),
                str(config.get("quantization", "")),
                str(config.get("architecture", "")),
                _short(model["id"]),
                _ago(int(model.get("created") or 0)),
                str(config.get("size", "")),
            )
    _print_table(table)


app.command(name="ls", help="List the models in the store (alias of list).")(list_models)


@app.command()
def rm(
    models: Annotated[list[str], typer.Argument(help="Names or IDs")],
    force: bool = typer.Option(False, "-f", "--force", help="Delete even with several tags"),
) -> None:
    """Remove models (by tag: untag, deleting the model once no tag is left)."""
    for name in models:
        report = _request("DELETE", f"/models/{_path(name)}", params={"force": str(force).lower()})
        for line in report or []:
            for key, value in line.items():
                console.print(f"{key}: {value}", highlight=False)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Name or ID"),
    openai: bool = typer.Option(False, "--openai", help="OpenAI's model shape"),
    remote: bool = typer.Option(False, "-r", "--remote", help="Inspect the registry's copy"),
) -> None:
    """Show a model's details as JSON."""
    params = {"remote": "true"} if remote else None
    info: dict[str, Any] = _request("GET", f"/models/{_path(model)}", params=params)
    if openai:
        tags = info.get("tags") or [_short(info["id"])]
        _print_json(
            {
                "id": tags[0],
                "object": "model",
                "created": info.get("created", 0),
                "owned_by": "docker",
            }
        )
        return
    _print_json(info)


@app.command()
def show(model: str = typer.Argument(..., help="Name or ID")) -> None:
    """Show a model's configuration in a readable form."""
    info: dict[str, Any] = _request("GET", f"/models/{_path(model)}")
    config = info.get("config") or {}
    table = Table(show_header=False, box=None)
    table.add_row("ID", info["id"])
    table.add_row("Tags", ", ".join(info.get("tags") or []))
    for key in ("format", "architecture", "parameters", "quantization", "size", "context_size"):
        if config.get(key) not in (None, ""):
            table.add_row(key.replace("_", " ").capitalize(), str(config[key]))
    gguf = config.get("gguf") or {}
    template = gguf.get("tokenizer.chat_template")
    if template:
        table.add_row("Chat template", template if len(template) < 400 else template[:400] + "…")
    _print_table(table)


@app.command()
def tag(
    source: str = typer.Argument(..., help="Existing model name or ID"),
    target: str = typer.Argument(..., help="New name, repo[:tag]"),
) -> None:
    """Give a model another name."""
    repo, tag_name = target, ""
    slash, colon = target.rfind("/"), target.rfind(":")
    if colon > slash:
        repo, tag_name = target[:colon], target[colon + 1 :]
    params = {"repo": repo, "tag": tag_name} if tag_name else {"repo": repo}
    answer = _request("POST", f"/models/{_path(source)}/tag", params=params)
    console.print(f"Model {source} tagged as {answer.get('target', target)}", highlight=False)


@app.command()
def df() -> None:
    """Disk used by models and engines."""
    usage = _request("GET", "/engines/df")
    from dmr.distribution.packaging import human_size

    table = Table("TYPE", "SIZE", box=None)
    table.add_row("Models", human_size(int(usage.get("models_disk_usage", 0))))
    table.add_row("Inference engine", human_size(int(usage.get("default_backend_disk_usage", 0))))
    _print_table(table)


@app.command()
def purge(force: bool = typer.Option(False, "-f", "--force", help="Do not ask")) -> None:
    """Remove every model from the store."""
    if not force and not typer.confirm("Remove every model from the store?"):
        _fail("purge cancelled")
    _request("DELETE", "/models/purge")
    console.print("Model store purged.")


@app.command()
def package(
    target: str = typer.Argument(..., help="Name for the packaged model (org/model:tag)"),
    gguf: Annotated[
        list[Path] | None,
        typer.Option("--gguf", help="GGUF file; repeat for shards, or give the first shard"),
    ] = None,
    safetensors_dir: Annotated[Path | None, typer.Option("--safetensors-dir")] = None,
    dduf: Annotated[Path | None, typer.Option("--dduf", help="DDUF archive")] = None,
    from_model: str | None = typer.Option(None, "--from", help="Repackage a stored model"),
    chat_template: Annotated[Path | None, typer.Option("--chat-template")] = None,
    licenses: Annotated[
        list[Path] | None, typer.Option("-l", "--license", help="License file (repeatable)")
    ] = None,
    mmproj: Annotated[Path | None, typer.Option("--mmproj", help="Multimodal projector")] = None,
    context_size: int | None = typer.Option(None, "--context-size", min=1),
    push: bool = typer.Option(False, "--push", help="Push to the registry afterwards"),
) -> None:
    """Package local model files as an OCI model artifact in the store."""
    from dmr.distribution.packaging import (
        PackageOptions,
        package_dduf,
        package_gguf,
        package_safetensors_dir,
    )
    from dmr.errors import DmrError
    from dmr.reference import InvalidReferenceError, parse_reference

    gguf = gguf or []
    licenses = licenses or []
    try:
        parse_reference(target)
    except InvalidReferenceError as error:
        _fail(str(error))
    sources = sum(bool(s) for s in (gguf, safetensors_dir, dduf, from_model))
    if sources != 1:
        _fail("give exactly one of --gguf, --safetensors-dir, --dduf or --from")
    if from_model:
        if licenses or chat_template or mmproj:
            _fail("--from only changes --context-size")
        _request(
            "POST",
            f"/models/{_path(from_model)}/repackage",
            json={"target": target, "context_size": context_size},
        )
        console.print(f"Model repackaged as {target}", highlight=False)
    else:
        options = PackageOptions(
            licenses=licenses, chat_template=chat_template, mmproj=mmproj, context_size=context_size
        )
        try:
            if gguf:
                artifact = package_gguf(gguf, options)
            elif safetensors_dir:
                artifact = package_safetensors_dir(safetensors_dir, options)
            else:
                assert dduf is not None
                artifact = package_dduf(dduf, options)
        except (DmrError, OSError) as error:
            _fail(getattr(error, "message", None) or str(error))
        _upload(artifact, target)
        console.print(f"Model packaged as {target} ({artifact.digest})", highlight=False)
    if push:
        from dmr.cli.transfer import push as push_command

        push_command(target)


def _upload(artifact: Any, target: str) -> None:
    from dmr.distribution.tarball import iter_artifact_tar

    chunks: Iterator[bytes] = iter_artifact_tar(artifact)
    _request(
        "POST",
        "/models/load",
        params={"tag": target},
        content=chunks,
        headers={"Content-Type": "application/x-tar"},
        timeout=None,
    )
