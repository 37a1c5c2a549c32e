"""Two models busy at once on one CPU: dmr (its runners share the cores), dmr with
`DMR_CPU_SHARE=0`, and two native llama-servers, one per model, as Docker Model
Runner and Ollama run two models (each with a thread per core).

    python bench/cpu_share.py [--models smollm2,smollm2] [--streams 4] [--max-tokens 64]
                              [--rounds 3] [--json out.json]

`--models` names the two GGUFs as `bench/llamacpp_concurrency.py` does (`smollm2`,
`random-0.6b`, `NAME=PATH`); the default is SmolLM2 twice (two model IDs, two runners).
Each round streams `--streams` chats to each model at once and measures the
aggregate tokens/s of all of them (every stream's tokens over the wall time from the
first request to the last token) and the slowest stream's tokens/s. A `one model`
case sends all the streams to one model of dmr, the ceiling of the machine. The
targets take turns round by round; the figures are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from dmr.testing import free_port
from dmr_served import dmr_served
from llamacpp_concurrency import bench_models, llama_server_binary, repack_flags

MODELS = ("ai/smollm2-a", "ai/smollm2-b")
PROMPT = "Write a long story about a lighthouse keeper and the sea."


def store_two_models(models_path: Path, ggufs: list[Path]) -> None:
    from dmr.distribution.packaging import PackageOptions, package_gguf, write_to_store
    from dmr.store import Store

    store = Store.open(models_path)
    created = ("2024-11-01T00:00:00Z", "2024-11-02T00:00:00Z")
    for tag, gguf, when in zip(MODELS, ggufs, created, strict=True):
        write_to_store(store, package_gguf([gguf], PackageOptions(created=when)), [tag])


async def stream(
    client: httpx.AsyncClient, path: str, model: str, tokens: int, prompt: str = PROMPT
) -> float:
    """One streamed chat of `tokens` tokens (ignore_eos); its tokens/s."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.7,
        "stream": True,
    }
    began = time.perf_counter()
    async with client.stream("POST", path, json=body) as answer:
        if answer.status_code != 200:
            raise RuntimeError(f"{answer.status_code}: {(await answer.aread())[:300]!r}")
        async for _line in answer.aiter_lines():
            pass
    return tokens / (time.perf_counter() - began)


def round_of(
    clients: list[tuple[httpx.AsyncClient, str, str]], streams: int, tokens: int
) -> Callable[[], Awaitable[dict[str, float]]]:
    """`streams` chats to each (client, path, model) at once."""

    async def run() -> dict[str, float]:
        began = time.perf_counter()
        rates = await asyncio.gather(
            *(
                stream(client, path, model, tokens)
                for client, path, model in clients
                for _ in range(streams)
            )
        )
        wall = time.perf_counter() - began
        return {"aggregate": len(rates) * tokens / wall, "slowest": min(rates)}

    return run


def llama_server(
    gguf: Path, streams: int, threads: int | None = None
) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
    return native_llama_server(
        gguf,
        *("--parallel", str(streams), "--ctx-size", str(4096 * streams)),
        "--jinja",
        *(("--threads", str(threads)) if threads else ()),
    )


@contextlib.asynccontextmanager
async def native_llama_server(gguf: Path, *flags: str) -> AsyncIterator[httpx.AsyncClient]:
    """llama-server on `gguf` with `flags` (and `repack_flags`), healthy before use."""
    port = free_port()
    argv = [
        str(llama_server_binary()),
        *("--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)),
        *flags,
        *repack_flags(gguf),
    ]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            for _ in range(600):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
            yield client
    finally:
        process.terminate()
        await process.wait()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    ggufs = [path for _name, path in bench_models(args.models)]
    if len(ggufs) != 2:
        raise SystemExit("--models names two GGUFs")
    cases: dict[str, Callable[[], Awaitable[dict[str, float]]]] = {}
    chat = "/engines/v1/chat/completions"
    with tempfile.TemporaryDirectory(prefix="dmr-cpu-share-") as temp:
        async with contextlib.AsyncExitStack() as stack:
            for name, share in (("dmr", "1"), ("dmr DMR_CPU_SHARE=0", "0")):
                folder = Path(temp) / share
                store_two_models(folder / "models", ggufs)
                base = await stack.enter_async_context(dmr_served(folder, DMR_CPU_SHARE=share))
                client = await stack.enter_async_context(
                    httpx.AsyncClient(base_url=base, timeout=600)
                )
                for model in MODELS:  # loaded before the clock runs
                    await stream(client, chat, model, 2)
                pair = [(client, chat, model) for model in MODELS]
                cases[name] = round_of(pair, args.streams, args.max_tokens)
                if share == "1":
                    one = [(client, chat, MODELS[0])]
                    cases["dmr, one model"] = round_of(one, 2 * args.streams, args.max_tokens)
            servers = [
                await stack.enter_async_context(llama_server(gguf, args.streams)) for gguf in ggufs
            ]
            for server in servers:
                await stream(server, "/v1/chat/completions", "x", 2)
            pair = [(server, "/v1/chat/completions", "x") for server in servers]
            cases["two llama-servers"] = round_of(pair, args.streams, args.max_tokens)

            results: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
            for round_number in range(args.rounds):
                for name, case in cases.items():
                    results[name].append(await case())
                    print(f"round {round_number + 1} {name}: {results[name][-1]}", file=sys.stderr)
    return {
        name: {
            key: round(statistics.median(r[key] for r in rounds), 1)
            for key in ("aggregate", "slowest")
        }
        for name, rounds in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,smollm2", help="the two GGUFs")
    parser.add_argument("--streams", type=int, default=4, help="streams per model")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    figures = asyncio.run(main_async(args))
    base = figures["two llama-servers"]["aggregate"]
    print(f"{'target':24} {'aggregate tok/s':>16} {'slowest stream':>15} {'÷ llama-servers':>16}")
    for name, row in figures.items():
        ratio = row["aggregate"] / base
        print(f"{name:24} {row['aggregate']:16.1f} {row['slowest']:15.1f} {ratio:16.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "figures": figures}, indent=2
            )
        )


if __name__ == "__main__":
    main()
