"""`dmr configure` and `dmr configure show`, with `docker model configure`'s flags.

Every flag becomes a key of the `_configure` body (docs/compatibility.md §4, §8);
the server keeps the configuration in the store, so it outlives a restart.
"""

from __future__ import annotations

import json
import re
from typing import Any

import click

from dmr.cli.client import connect
from dmr.cli.errors import CliError, error_message, fail
from dmr.cli.http import HTTPError, TransportError
from dmr.durations import parse_duration

__all__ = ["configure", "hf_overrides", "show", "think_budget"]

# Docker Model Runner's reasoning budgets for `--think` (configure_flags.go).
REASONING_UNLIMITED = -1
REASONING_OFF = 0

# Go's strconv.ParseBool, which reads DMR's `--think=VALUE`.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})

# DMR's check of `--hf_overrides` keys (pkg/inference/hf_overrides.go): they become a
# JSON argument of vLLM's, and no key may smuggle anything else in.
_HF_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def think_budget(value: str) -> int:
    """`--think[=BOOL]` as DMR maps it: reasoning on (budget -1, unlimited) or off (0)."""
    if value in _TRUE:
        return REASONING_UNLIMITED
    if value in _FALSE:
        return REASONING_OFF
    raise click.BadParameter(f"expects true or false, got {value!r}", param_hint="'--think'")


def hf_overrides(text: str) -> dict[str, Any]:
    """`--hf_overrides JSON`: an object whose keys, nested ones included, are identifiers."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise click.BadParameter(f"invalid JSON: {error}", param_hint="'--hf_overrides'") from None
    if not isinstance(value, dict):
        raise click.BadParameter("expects a JSON object", param_hint="'--hf_overrides'")
    _check_hf_keys(value, "")
    return value


def _check_hf_keys(value: Any, path: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not _HF_KEY.fullmatch(key):
                raise click.BadParameter(
                    f"invalid key {path + key!r}: keys hold only letters, digits and "
                    "underscores, and do not start with a digit",
                    param_hint="'--hf_overrides'",
                )
            _check_hf_keys(item, f"{path}{key}.")
    elif isinstance(value, list):
        for item in value:
            _check_hf_keys(item, path)


class _ConfigureCommand(click.Command):
    """Reads `--think=VALUE` as DMR's bool flag does: bare `--think` means true, and a
    value must be attached with `=`, so `--think MODEL` never takes the model as its value."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rewritten: list[str] = []
        for index, arg in enumerate(args):
            if arg == "--":
                rewritten.extend(args[index:])
                break
            if arg.startswith("--think="):
                rewritten.extend(["--think-value", arg.removeprefix("--think=")])
            else:
                rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


@click.command(cls=_ConfigureCommand, context_settings={"ignore_unknown_options": True})
@click.argument("model")
@click.argument("flags", nargs=-1, type=click.UNPROCESSED)
@click.option("--context-size", type=click.IntRange(min=1), help="Context size in tokens.")
@click.option("--keep-alive", help="Idle time before unload: 5m, 0, -1.")
@click.option("--mode", help="completion, embedding, reranking, image-generation.")
@click.option(
    "--speculative-draft-model", "draft_model", help="Draft model for speculative decoding."
)
@click.option(
    "--speculative-num-tokens",
    "num_tokens",
    type=click.IntRange(min=1),
    help="Tokens the draft model predicts per step.",
)
@click.option(
    "--speculative-min-acceptance-rate",
    "min_acceptance_rate",
    type=click.FloatRange(0, 1),
    help="Minimum acceptance rate of drafted tokens (0 to 1).",
)
@click.option(
    "--hf_overrides",
    "--hf-overrides",
    "hf_overrides_json",
    metavar="JSON",
    help="Hugging Face model config overrides, a JSON object (vLLM only).",
)
@click.option(
    "--gpu-memory-utilization",
    type=float,
    help="Fraction of GPU memory for the model executor, in (0, 1] (vLLM only).",
)
@click.option(
    "--think",
    "think_flag",
    is_flag=True,
    default=False,
    help="Reasoning on (--think, --think=true) or off (--think=false) for thinking models.",
)
@click.option("--think-value", hidden=True)
@click.option(
    "--reasoning-budget",
    type=click.IntRange(min=-1),
    help="Thinking tokens for reasoning models (llama.cpp): -1 unlimited, 0 off.",
)
@click.option(
    "--ray-address",
    help="Ray cluster for vLLM's workers (HOST:PORT or auto); with "
    "`-- --distributed-executor-backend ray`.",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    help="Runners of the model to keep, each on another node of the server's Ray"
    " cluster (dmr serve --ray-address); requests are balanced between them.",
)
@click.option("--backend", help="Engine to configure.")
def configure(
    model: str,
    flags: tuple[str, ...],
    context_size: int | None,
    keep_alive: str | None,
    mode: str | None,
    draft_model: str | None,
    num_tokens: int | None,
    min_acceptance_rate: float | None,
    hf_overrides_json: str | None,
    gpu_memory_utilization: float | None,
    think_flag: bool,
    think_value: str | None,
    reasoning_budget: int | None,
    ray_address: str | None,
    replicas: int | None,
    backend: str | None,
) -> None:
    """Configure MODEL's runner; engine FLAGS go after `--`.

    The configuration is kept in the store and applied on every load, after a
    restart too. `dmr configure show [MODEL] [--format json|text]` lists the
    configurations, with where each value comes from (configure, model or default).
    """
    if model == "show":
        show.main(list(flags), prog_name="dmr configure show", standalone_mode=False)
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
    if replicas is not None:
        body["replicas"] = replicas
    speculative: dict[str, Any] = {}
    if draft_model:
        speculative["draft_model"] = draft_model
    if num_tokens is not None:
        speculative["num_tokens"] = num_tokens
    if min_acceptance_rate is not None:
        speculative["min_acceptance_rate"] = min_acceptance_rate
    if speculative:
        body["speculative"] = speculative
    vllm: dict[str, Any] = {}
    if hf_overrides_json is not None:
        vllm["hf-overrides"] = hf_overrides(hf_overrides_json)
    if gpu_memory_utilization is not None:
        if not 0 < gpu_memory_utilization <= 1:
            fail(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization:g}")
        vllm["gpu-memory-utilization"] = gpu_memory_utilization
    if ray_address is not None:
        vllm["ray-address"] = ray_address
    if vllm:
        body["vllm"] = vllm
    think = think_budget(think_value) if think_value is not None else None
    if think_flag:
        think = REASONING_UNLIMITED
    if think is not None and reasoning_budget is not None:
        fail("give --think or --reasoning-budget, not both")
    budget = think if think is not None else reasoning_budget
    if budget is not None:
        body["llamacpp"] = {"reasoning-budget": budget}
    if flags:
        body["runtime-flags"] = list(flags)
    path = f"/engines/{backend}/_configure" if backend else "/engines/_configure"
    _request("POST", path, json=body)
    click.echo(f"Configured {model}.")


@click.command()
@click.argument("model", required=False)
@click.option(
    "--format",
    "output",
    type=click.Choice(["json", "text"]),
    default="json",
    show_default=True,
    help="json: Docker Model Runner's output (with dmr's `sources`); text: a table.",
)
def show(model: str | None, output: str) -> None:
    """`dmr configure show [MODEL]`: each configured model's settings, and their sources."""
    query = {"model": model} if model else {}
    configs = _request("GET", "/engines/_configure", params=query)
    if output == "json":
        click.echo(json.dumps(configs, indent=2))
        return
    from rich.table import Table

    from dmr.cli.main import print_table

    table = Table("MODEL", "BACKEND", "MODE", "SETTING", "VALUE", "SOURCE", box=None)
    for item in configs:
        sources = item.get("sources") or {}
        first = True
        for setting, source in sorted(sources.items(), key=_setting_order):
            names = (item.get("model", ""), item.get("backend", ""), item.get("mode", ""))
            table.add_row(*(names if first else ("", "", "")), setting,
                          _setting_text(item.get(setting)), source)  # fmt: skip
            first = False
    print_table(table)


# The order `configure show --format text` lists settings in (the server's JSON sorts keys).
SETTING_ORDER = (
    "context-size", "runtime-flags", "keep_alive", "replicas", "speculative", "llamacpp", "vllm",
)  # fmt: skip


def _setting_order(entry: tuple[str, Any]) -> tuple[int, str]:
    name = entry[0]
    return (SETTING_ORDER.index(name) if name in SETTING_ORDER else len(SETTING_ORDER), name)


def _setting_text(value: Any) -> str:
    """`--temp 0.2` for flags, compact JSON for blocks, `(engine default)` for null."""
    if value is None:
        return "(engine default)"
    if isinstance(value, list):
        return " ".join(str(flag) for flag in value) or "(none)"
    if isinstance(value, dict):
        return json.dumps({k: v for k, v in value.items() if v is not None})
    return str(value)


def _request(method: str, path: str, **kwargs: Any) -> Any:
    """One API call: the JSON answer, or a clear error and exit code 1."""
    try:
        with connect(timeout=30.0) as client:
            response = client.request(method, path, **kwargs)
    except (TransportError, CliError) as error:
        fail(str(error))
    except HTTPError as error:
        fail(f"talking to the dmr server failed: {error}")
    if response.status_code >= 400:
        fail(error_message(response))
    return response.json() if response.content else None
