"""Model commands: `list/ls`, `rm`, `inspect`, `show`, `tag`, `package`, `df`, `purge`.

Like `docker model`, every command goes through the server's HTTP API; `package`
builds the artifact here and uploads it as a streamed tarball.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from dmr.cli.client import connect
from dmr.cli.errors import error_message, fail
from dmr.cli.http import HTTPError
from dmr.cli.main import console, print_table

__all__ = [
    "context_size",
    "df",
    "inspect",
    "list_models",
    "ls",
    "package",
    "purge",
    "rm",
    "show",
    "tag",
]


def _path(name: str) -> str:
    """A model name as a URL path, checked here: a client-side URL normaliser would
    turn `../x` into another path before the server could refuse it."""
    from dmr.reference import InvalidReferenceError, is_model_id, parse_reference

    if not is_model_id(name):
        try:
            parse_reference(name)
        except InvalidReferenceError as error:
            fail(str(error))
    return quote(name, safe="/:@")


def _request(method: str, path: str, **kwargs: Any) -> Any:
    """One API call: the JSON answer, or a clear error and exit code 1."""
    try:
        with connect(timeout=kwargs.pop("timeout", 300.0)) as client:
            response = client.request(method, path, **kwargs)
    except HTTPError as error:
        fail(str(error))
    if response.status_code >= 400:
        fail(error_message(response))
    return response.json() if response.content else None


def _print_json(value: Any) -> None:
    # print(), not rich: scripts parse this, so no wrapping or highlighting.
    print(json.dumps(value, indent=2))


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


def _list_options(function: Any) -> Any:
    function = click.option(
        "--openaiurl", metavar="URL", help="List the models of this OpenAI-compatible endpoint."
    )(function)
    function = click.option("-q", "--quiet", is_flag=True, help="Only model IDs")(function)
    function = click.option("--openai", is_flag=True, help="OpenAI's /v1/models shape")(function)
    function = click.option("--json", "as_json", is_flag=True, help="The server's JSON")(function)
    return click.argument("model", required=False)(function)


def _matches(tag: str, wanted: str) -> bool:
    """Docker Model Runner's `ls MODEL` filter: `repo:tag` names one tag; a bare
    repository matches each of its tags."""
    if ":" in wanted.rsplit("/", 1)[-1]:
        return tag == wanted
    return tag.rsplit(":", 1)[0] == wanted if ":" in tag.rsplit("/", 1)[-1] else tag == wanted


def _filtered(models: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """The models with a tag matching MODEL, with only those tags (`docker model ls
    smollm2` is `ai/smollm2`, as `docker model` adds `ai/` to a name without a slash)."""
    model = model.removeprefix("index.docker.io/").removeprefix("docker.io/")
    wanted = model if "/" in model else f"ai/{model}"
    kept = []
    for item in models:
        tags = [tag for tag in item.get("tags") or [] if _matches(tag, wanted)]
        if tags:
            kept.append({**item, "tags": tags})
    return kept


def context_size(config: dict[str, Any]) -> str:
    """The CONTEXT column: the packaged context size, else the GGUF's trained one
    (`<architecture>.context_length`), as `docker model ls` prints it."""
    if config.get("context_size"):
        return str(config["context_size"])
    gguf = config.get("gguf") or {}
    architecture = gguf.get("general.architecture") or config.get("architecture") or "llama"
    trained = gguf.get(f"{architecture}.context_length") or gguf.get("llama.context_length")
    return str(trained) if trained not in (None, "") else ""


def _list_elsewhere(url: str, model: str | None, as_json: bool) -> None:
    """`ls --openaiurl URL`: `GET URL/models`, as docker model lists another endpoint's."""
    from urllib.parse import urlsplit

    from dmr.cli.http import ServerClient

    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        fail(f"invalid OpenAI URL {url!r}: give http(s)://HOST[:PORT][/PATH], e.g. .../v1")
    try:
        with ServerClient(url) as client:
            answer = client.get("/models")
    except HTTPError as error:
        fail(f"Failed to list models from OpenAI endpoint: {error}")
    if answer.status_code >= 400:
        fail(f"Failed to list models from OpenAI endpoint: {error_message(answer)}")
    try:
        listed = answer.json()
        data = [item for item in listed["data"] if isinstance(item, dict) and "id" in item]
    except (ValueError, KeyError, TypeError):
        fail(f"{url}/models did not answer with an OpenAI model list")
    if model:
        data = [item for item in data if _matches(str(item["id"]), model)]
    if as_json:
        _print_json({**listed, "data": data})
        return
    from rich.table import Table

    table = Table("MODEL NAME", "CREATED", box=None)
    for item in sorted(data, key=lambda item: str(item["id"]).lower()):
        table.add_row(str(item["id"]), _ago(int(item.get("created") or 0)))
    print_table(table)


def _list(
    model: str | None, as_json: bool, openai: bool, quiet: bool, openaiurl: str | None = None
) -> None:
    if openai and quiet:
        fail("--quiet flag cannot be used with --openai flag or OpenAI backend")
    if openaiurl is not None:
        if quiet:
            fail("--quiet flag cannot be used with --openaiurl flag")
        _list_elsewhere(openaiurl, model, as_json)
        return
    models: list[dict[str, Any]] = _request("GET", "/models")
    if model:
        models = _filtered(models, model)
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
        for item in models:
            print(_short(item["id"]))
        return
    from rich.table import Table

    table = Table("MODEL NAME", "PARAMETERS", "QUANTIZATION", "ARCHITECTURE", "MODEL ID",
                  "CREATED", "CONTEXT", "SIZE", box=None)  # fmt: skip
    for item in models:
        config = item.get("config") or {}
        for name in item.get("tags") or ["<none>"]:
            table.add_row(
                name,
                str(config.get("parameters", "")),
                str(config.get("quantization", "")),
                str(config.get("architecture", "")),
                _short(item["id"]),
                _ago(int(item.get("created") or 0)),
                context_size(config),
                str(config.get("size", "")),
            )
    print_table(table)


@click.command(name="list")
@_list_options
def list_models(
    model: str | None, as_json: bool, openai: bool, quiet: bool, openaiurl: str | None
) -> None:
    """List the models in the store, or only MODEL's tags (`ls smollm2`: ai/smollm2)."""
    _list(model, as_json, openai, quiet, openaiurl)


@click.command(name="ls")
@_list_options
def ls(model: str | None, as_json: bool, openai: bool, quiet: bool, openaiurl: str | None) -> None:
    """List the models in the store, or only MODEL's tags (alias of list)."""
    _list(model, as_json, openai, quiet, openaiurl)


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Delete even with several tags")
def rm(models: tuple[str, ...], force: bool) -> None:
    """Remove MODELS, by name or ID (by tag: untag, deleting the model once no tag is left)."""
    for name in models:
        report = _request("DELETE", f"/models/{_path(name)}", params={"force": str(force).lower()})
        for line in report or []:
            for key, value in line.items():
                console.print(f"{key}: {value}", highlight=False)


@click.command()
@click.argument("model")
@click.option("--openai", is_flag=True, help="OpenAI's model shape")
@click.option("-r", "--remote", is_flag=True, help="Inspect the registry's copy")
def inspect(model: str, openai: bool, remote: bool) -> None:
    """Show the details of MODEL (name or ID) as JSON."""
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


@click.command()
@click.argument("model")
@click.option("-r", "--remote", is_flag=True, help="Show the registry's copy, without pulling")
def show(model: str, remote: bool) -> None:
    """Show the configuration of MODEL (name or ID) in a readable form."""
    params = {"remote": "true"} if remote else None
    info: dict[str, Any] = _request("GET", f"/models/{_path(model)}", params=params)
    config = info.get("config") or {}
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_row("ID", info["id"])
    table.add_row("Tags", ", ".join(info.get("tags") or []))
    for key in ("format", "architecture", "parameters", "quantization", "size", "context_size"):
        if config.get(key) not in (None, ""):
            table.add_row(key.replace("_", " ").capitalize(), str(config[key]))
    capabilities = info.get("capabilities") or []
    if capabilities:  # beyond text, as the store sees them: "vision" with a projector
        table.add_row("Capabilities", ", ".join(capabilities))
    gguf = config.get("gguf") or {}
    template = gguf.get("tokenizer.chat_template")
    if template:
        table.add_row("Chat template", template if len(template) < 400 else template[:400] + "…")
    print_table(table)


@click.command()
@click.argument("source")
@click.argument("target")
def tag(source: str, target: str) -> None:
    """Give a model (SOURCE: name or ID) another name (TARGET: repo[:tag])."""
    repo, tag_name = target, ""
    slash, colon = target.rfind("/"), target.rfind(":")
    if colon > slash:
        repo, tag_name = target[:colon], target[colon + 1 :]
    params = {"repo": repo, "tag": tag_name} if tag_name else {"repo": repo}
    answer = _request("POST", f"/models/{_path(source)}/tag", params=params)
    console.print(f"Model {source} tagged as {answer.get('target', target)}", highlight=False)


@click.command()
def df() -> None:
    """Disk used by models and engines."""
    usage = _request("GET", "/engines/df")
    from rich.table import Table

    from dmr.sizes import human_size

    table = Table("TYPE", "SIZE", box=None)
    table.add_row("Models", human_size(int(usage.get("models_disk_usage", 0))))
    table.add_row("Inference engine", human_size(int(usage.get("default_backend_disk_usage", 0))))
    if "prompt_cache_disk_usage" in usage:  # a Docker Model Runner does not report it
        table.add_row("Prompt caches", human_size(int(usage["prompt_cache_disk_usage"])))
    print_table(table)


@click.command()
@click.option("-f", "--force", is_flag=True, help="Do not ask")
def purge(force: bool) -> None:
    """Remove every model from the store."""
    if not force and not click.confirm("Remove every model from the store?"):
        fail("purge cancelled")
    _request("DELETE", "/models/purge")
    console.print("Model store purged.")


_FILE = click.Path(path_type=Path)


@click.command()
@click.argument("target")
@click.option(
    "--gguf", multiple=True, type=_FILE, help="GGUF file; repeat for shards, or give the first"
)
@click.option("--safetensors-dir", type=_FILE, help="Directory of safetensors and configs")
@click.option("--dduf", type=_FILE, help="DDUF archive")
@click.option("--from", "from_model", help="Repackage a stored model")
@click.option("--chat-template", type=_FILE, help="Jinja chat template file")
@click.option("-l", "--license", "licenses", multiple=True, type=_FILE, help="License file")
@click.option("--mmproj", type=_FILE, help="Multimodal projector")
@click.option("--context-size", type=click.IntRange(min=1), help="Context size in tokens")
@click.option("--push", is_flag=True, help="Push to the registry afterwards")
@click.option(
    "--format", "artifact_format", type=click.Choice(["docker", "cncf"]), default="docker",
    show_default=True,
    help="Artifact format: docker, or cncf (CNCF ModelPack, as DMR writes it).",
)  # fmt: skip
def package(
    target: str,
    gguf: tuple[Path, ...],
    safetensors_dir: Path | None,
    dduf: Path | None,
    from_model: str | None,
    chat_template: Path | None,
    licenses: tuple[Path, ...],
    mmproj: Path | None,
    context_size: int | None,
    push: bool,
    artifact_format: str,
) -> None:
    """Package local model files as an OCI model artifact named TARGET (org/model:tag)."""
    if artifact_format == "cncf" and from_model:
        fail(
            "--format cncf: a stored model is repackaged in its own format; package its"
            " files with --format cncf instead"
        )
    from dmr.distribution.packaging import (
        PackageOptions,
        package_dduf,
        package_gguf,
        package_safetensors_dir,
        to_modelpack,
    )
    from dmr.errors import DmrError
    from dmr.reference import InvalidReferenceError, parse_reference

    try:
        parse_reference(target)
    except InvalidReferenceError as error:
        fail(str(error))
    sources = sum(bool(s) for s in (gguf, safetensors_dir, dduf, from_model))
    if sources != 1:
        fail("give exactly one of --gguf, --safetensors-dir, --dduf or --from")
    if from_model:
        if licenses or chat_template or mmproj:
            fail("--from only changes --context-size")
        _request(
            "POST",
            f"/models/{_path(from_model)}/repackage",
            json={"target": target, "context_size": context_size},
        )
        console.print(f"Model repackaged as {target}", highlight=False)
    else:
        options = PackageOptions(
            licenses=list(licenses),
            chat_template=chat_template,
            mmproj=mmproj,
            context_size=context_size,
        )
        try:
            if gguf:
                artifact = package_gguf(list(gguf), options)
            elif safetensors_dir:
                artifact = package_safetensors_dir(safetensors_dir, options)
            else:
                assert dduf is not None
                artifact = package_dduf(dduf, options)
            if artifact_format == "cncf":
                artifact = to_modelpack(artifact)
        except (DmrError, OSError) as error:
            fail(getattr(error, "message", None) or str(error))
        _upload(artifact, target)
        console.print(f"Model packaged as {target} ({artifact.digest})", highlight=False)
    if push:
        from dmr.cli.transfer import push_model

        push_model(target)


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
