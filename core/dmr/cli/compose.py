"""`dmr compose up|down|metadata`: the provider protocol Docker Compose speaks to
`docker model` for services with `provider: type: model`.

Compose runs the `docker-model` plugin (`dmr docker-plugin install`) as
`docker-model compose --project-name NAME up --OPTION=VALUE ... SERVICE` (the
service's `provider.options`), `... down SERVICE`, and `compose metadata` to learn
the options. It reads stdout as JSON lines: `{"type": "info"|"error"|"setenv",
"message": ...}`; each `setenv` `KEY=VALUE` reaches the services that depend on
this one as `<SERVICE>_KEY` (`LLM_URL`, `LLM_MODEL`). Lines, options and the
metadata are Docker Model Runner's (cmd/cli/commands/compose.go): `up` pulls each
model the store lacks, configures each (context size, raw runtime flags,
speculative decoding) and sets `MODEL` (the models, comma-joined) and `URL` (the
server's OpenAI base URL, as `dmr status --json` gives it); `down` does nothing.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

from dmr.cli.http import HTTPError, ServerClient, ndjson_events

__all__ = ["compose"]


def _line(kind: str, message: str) -> None:
    print(json.dumps({"type": kind, "message": message}), flush=True)


def _info(message: str) -> None:
    _line("info", message)


def _setenv(key: str, value: str) -> None:
    _line("setenv", f"{key}={value}")


def _error(message: str) -> NoReturn:
    """An `error` line for Compose, the same on stderr for a person, and exit 1."""
    _line("error", message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


@click.group(name="compose", hidden=True)
@click.option("--project-name", default="", help="compose project name")  # unused, as DMR's
def compose(project_name: str) -> None:
    """Docker Compose's provider protocol for `provider: type: model` services."""


def _error_text(response: Any) -> str:
    from dmr.cli.errors import error_message

    return str(error_message(response))


def _pull_missing(client: ServerClient, models: tuple[str, ...]) -> None:
    """Pull each model the store lacks. DMR compares the name with each stored ID and
    tag as written, so `ai/smollm2` is pulled again beside `ai/smollm2:latest`; dmr
    asks the server, which resolves names as every command does (no pull for a
    model already there, which a local-only model could not survive)."""
    from urllib.parse import quote

    for model in models:
        found = client.get(f"/models/{quote(model, safe='/:@')}")
        if found.status_code == 200:
            continue
        if found.status_code != 404:
            _error(f"Failed to get models list: {_error_text(found)}")
        with client.stream("POST", "/models/create", json={"from": model}, timeout=None) as pull:
            if pull.status_code >= 400:
                _error(f"Failed to pull model: {_error_text(pull)}")
            for event in ndjson_events(pull.iter_lines()):
                if event.get("type") == "error":
                    _error(f"Failed to pull model: {event.get('message', 'unknown error')}")
                if event.get("message"):
                    _info(str(event["message"]))


@compose.command()
@click.argument("services", nargs=-1)
# Required (the metadata says so), but checked in the body: DMR answers a missing one
# with an `error` line Compose shows, not a usage message.
@click.option("--model", "models", multiple=True, help="model to use")
@click.option("--context-size", type=int, default=-1, help="context size for the model")
@click.option(
    "--runtime-flags", default="", help="raw runtime flags to pass to the inference engine"
)
@click.option("--backend", default="llama.cpp", help="inference backend to use")
@click.option("--speculative-draft-model", default="", help="draft model for speculative decoding")
@click.option(
    "--speculative-num-tokens",
    type=int,
    default=0,
    help="number of tokens to predict speculatively",
)
@click.option("--speculative-min-acceptance-rate", type=float, default=0.0,
              help="minimum acceptance rate for speculative decoding")  # fmt: skip
def up(
    services: tuple[str, ...],
    models: tuple[str, ...],
    context_size: int,
    runtime_flags: str,
    backend: str,
    speculative_draft_model: str,
    speculative_num_tokens: int,
    speculative_min_acceptance_rate: float,
) -> None:
    """Pull and configure the models, then give Compose MODEL and URL."""
    from dmr.cli.client import connect
    from dmr.cli.runners import openai_endpoint

    if not models:
        _error("options.model is required")
    _info("Initializing model runner...")
    try:
        client = connect(timeout=None)  # the server is started here when none answers
    except HTTPError as error:
        _error(f"Failed to get standalone model runner info: {error}")
    with client:
        try:
            _pull_missing(client, models)
            _setenv("MODEL", ",".join(models))
            if context_size > 0:
                _info(f"Setting context size to {context_size}")
            if runtime_flags:
                _info("Setting raw runtime flags to " + runtime_flags)
            body: dict[str, Any] = {}
            if speculative_draft_model or speculative_num_tokens > 0:
                body["speculative"] = {
                    "draft_model": speculative_draft_model,
                    "num_tokens": speculative_num_tokens,
                    "min_acceptance_rate": speculative_min_acceptance_rate,
                }
                _info(f"Enabling speculative decoding with draft model: {speculative_draft_model}")
            # As DMR: a context size only when one was given (-1, its default, is none).
            if click.get_current_context().get_parameter_source("context_size") not in (
                click.core.ParameterSource.DEFAULT,
                None,
            ):
                body["context-size"] = context_size
            if runtime_flags:
                body["raw-runtime-flags"] = runtime_flags
            for model in models:
                answer = client.post("/engines/_configure", json={"model": model, **body})
                if answer.status_code >= 400:
                    _error(
                        f"failed to configure backend for model {model} with context-size"
                        f" {context_size}  and runtime-flags {runtime_flags}: {_error_text(answer)}"
                    )
                _info("Successfully configured backend for model " + model)
        except HTTPError as error:
            _error(f"talking to the dmr server failed: {error}")
        from dmr.cli.autostart import client_address

        _setenv("URL", openai_endpoint(client_address()))


@compose.command()
@click.argument("services", nargs=-1)
def down(services: tuple[str, ...]) -> None:
    """Nothing to clean up (as DMR): the models stay, their runners idle out."""


# pflag's names for the option types, as DMR's metadata gives them.
_PFLAG_TYPES = {"integer": "int", "float": "float64", "text": "string"}
_PFLAG_TYPE_OF = {"context-size": "int64"}  # DMR's Int64Var
_REQUIRED = {"model"}


def _parameters(command: click.Command) -> list[dict[str, Any]]:
    """DMR's commandParameters: each flag, in pflag's (sorted) order."""
    parameters: list[dict[str, Any]] = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        name = param.opts[0].lstrip("-")
        kind = _PFLAG_TYPE_OF.get(name) or _PFLAG_TYPES.get(param.type.name, "string")
        if param.multiple:
            kind = "stringArray"
        default = param.default
        if param.multiple:
            text = "[]"
        elif isinstance(default, float) and default.is_integer():
            text = str(int(default))
        else:
            text = "" if default is None else str(default)
        item: dict[str, Any] = {
            "name": name,
            "description": param.help or "",
            "required": param.required or name in _REQUIRED,
            "type": kind,
        }
        if text:
            item["default"] = text
        parameters.append(item)
    return sorted(parameters, key=lambda item: item["name"])


@compose.command()
def metadata() -> None:
    """Metadata for Docker Compose"""
    described = {
        "description": "Docker Model Runner",
        "up": {"parameters": _parameters(up)},
        # Go marshals DMR's empty parameter list (nil) as null.
        "down": {"parameters": _parameters(down) or None},
    }
    sys.stdout.write(json.dumps(described, separators=(",", ":")))
