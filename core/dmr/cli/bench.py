"""`dmr bench MODEL`: throughput and latency of streamed chat completions per concurrency level."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import click

from dmr.cli.client import auth_headers, server_url
from dmr.cli.errors import fail
from dmr.cli.main import console
from dmr.durations import parse_duration

if TYPE_CHECKING:  # imported when a benchmark runs: the CLI's start-up stays light
    import httpx

__all__ = ["LevelResult", "bench", "percentile", "run_level"]

CHAT_PATH = "/engines/v1/chat/completions"
DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."


@dataclass
class RequestSample:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    completion_tokens: int = 0


@dataclass
class LevelResult:
    concurrency: int
    duration_s: float  # wall time from the first request to the last answer
    requests: int
    errors: int
    completion_tokens: int
    tokens_per_second: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    first_error: str | None = field(default=None)


def percentile(values: list[float], fraction: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


async def _one_request(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> tuple[RequestSample, str]:
    started = time.perf_counter()
    sample = RequestSample(ok=False)
    content_chunks = 0
    usage_tokens: int | None = None
    async with client.stream("POST", CHAT_PATH, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:300]
            return sample, f"HTTP {response.status_code}: {text}"
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content"):
                    content_chunks += 1
                    if sample.ttft is None:
                        sample.ttft = time.perf_counter() - started
            usage = chunk.get("usage")
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
    sample.latency = time.perf_counter() - started
    # The runner's own count when it reports usage; else one token per streamed chunk.
    sample.completion_tokens = usage_tokens if usage_tokens is not None else content_chunks
    sample.ok = True
    return sample, ""


async def run_level(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    concurrency: int,
    duration: float,
    request_timeout: float | None = None,
) -> LevelResult:
    """`concurrency` workers send requests back to back until `duration` has passed;
    requests in flight then are waited for and counted. A request that takes longer
    than `request_timeout` (`--timeout`, as docker model bench's) is an error."""
    import anyio
    import httpx

    samples: list[RequestSample] = []
    errors: list[str] = []
    started = time.perf_counter()
    deadline = started + duration

    async def worker() -> None:
        while time.perf_counter() < deadline:
            try:
                with anyio.fail_after(request_timeout):
                    sample, error = await _one_request(client, body)
            except TimeoutError:
                sample = RequestSample(ok=False)
                error = f"the request took more than --timeout ({request_timeout:g} s)"
            except (httpx.HTTPError, ValueError) as exc:
                sample, error = RequestSample(ok=False), f"{type(exc).__name__}: {exc}"
            samples.append(sample)
            if error:
                errors.append(error)

    async with anyio.create_task_group() as group:
        for _ in range(concurrency):
            group.start_soon(worker)
    elapsed = time.perf_counter() - started
    good = [s for s in samples if s.ok]
    tokens = sum(s.completion_tokens for s in good)
    ttfts = [s.ttft for s in good if s.ttft is not None]
    latencies = [s.latency for s in good]
    return LevelResult(
        concurrency=concurrency,
        duration_s=round(elapsed, 3),
        requests=len(samples),
        errors=len(errors),
        completion_tokens=tokens,
        tokens_per_second=round(tokens / elapsed, 2) if elapsed > 0 else 0.0,
        ttft_p50_ms=_ms(percentile(ttfts, 0.5)),
        ttft_p95_ms=_ms(percentile(ttfts, 0.95)),
        latency_p50_ms=_ms(percentile(latencies, 0.5)),
        latency_p95_ms=_ms(percentile(latencies, 0.95)),
        first_error=errors[0] if errors else None,
    )


def _async_client(max_connections: int) -> httpx.AsyncClient:
    import httpx

    base_url, socket_path = server_url()
    transport = httpx.AsyncHTTPTransport(
        uds=str(socket_path) if socket_path else None,
        limits=httpx.Limits(max_connections=max_connections),
    )
    headers = auth_headers()
    # No read timeout: a loaded CPU may take long before the first token.
    timeout = httpx.Timeout(None, connect=10.0)
    return httpx.AsyncClient(
        base_url=base_url, transport=transport, headers=headers, timeout=timeout
    )


async def _bench(
    model: str,
    levels: list[int],
    duration: float,
    body: dict[str, Any],
    request_timeout: float | None = None,
) -> list[LevelResult]:
    async with _async_client(max(levels) + 1) as client:
        # Load the model first so the first level's TTFT does not include the load.
        warm, error = await _one_request(client, {**body, "max_tokens": 1})
        if not warm.ok:
            raise RuntimeError(f"warm-up request to {model} failed: {error}")
        return [await run_level(client, body, level, duration, request_timeout) for level in levels]


def _parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter("expected a comma list of integers, e.g. 1,2,4,8") from None
    if not levels or any(level < 1 for level in levels):
        raise click.BadParameter("concurrency levels must be positive integers")
    return levels


def _print_table(model: str, results: list[LevelResult]) -> None:
    from rich.table import Table

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    # Short headers so the table fits an 80-column terminal unwrapped.
    table = Table(title=f"dmr bench {model} (times in ms)")
    for column in ("conc", "reqs", "errs", "tokens", "tok/s"):
        table.add_column(column, justify="right")
    for column in ("TTFT p50", "TTFT p95", "lat p50", "lat p95"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r.concurrency),
            str(r.requests),
            str(r.errors),
            str(r.completion_tokens),
            f"{r.tokens_per_second:.1f}",
            fmt(r.ttft_p50_ms),
            fmt(r.ttft_p95_ms),
            fmt(r.latency_p50_ms),
            fmt(r.latency_p95_ms),
        )
    console.print(table)
    for r in results:
        if r.first_error:
            console.print(f"[red]concurrency {r.concurrency}: {r.first_error}[/red]")


def _positive_duration(text: str, option: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint=option) from None
    if seconds <= 0:
        raise click.BadParameter("must be positive", param_hint=option)
    return seconds


@click.command()
@click.argument("model")
@click.option(
    "--concurrency", default="1,2,4,8", show_default=True,
    help="Comma list of concurrent clients per level.",
)  # fmt: skip
@click.option(
    "--duration", default="30s", show_default=True,
    help="How long each level runs (e.g. 30s, 2m).",
)  # fmt: skip
@click.option("--max-tokens", default=128, show_default=True, help="max_tokens of each request.")
@click.option("--prompt", default=DEFAULT_PROMPT, help="The user message each request sends.")
@click.option(
    "--timeout", "request_timeout", default="5m", show_default=True,
    help="Longest one request may take (e.g. 30s, 5m); a slower one counts as an error.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench(
    model: str,
    concurrency: str,
    duration: str,
    max_tokens: int,
    prompt: str,
    request_timeout: str,
    as_json: bool,
) -> None:
    """Measure tokens/s, time to first token and latency of MODEL at concurrency levels."""
    levels = _parse_levels(concurrency)
    seconds = _positive_duration(duration, "--duration")
    timeout_seconds = _positive_duration(request_timeout, "--timeout")
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    import anyio
    import httpx

    from dmr.cli.autostart import ensure_server
    from dmr.cli.http import TransportError

    try:
        ensure_server()  # started here when none answers, as for every other command
    except TransportError as error:
        fail(str(error))
    try:
        results = anyio.run(_bench, model, levels, seconds, body, timeout_seconds)
    except (RuntimeError, httpx.HTTPError) as error:
        fail(str(error))
    if as_json:
        click.echo(json.dumps({"model": model, "levels": [asdict(r) for r in results]}, indent=2))
    else:
        _print_table(model, results)
    if any(r.errors for r in results):
        raise SystemExit(1)
