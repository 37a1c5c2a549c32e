"""Generation next to busy neighbours: one streamed chat's decode rate alone and while
other processes keep cores busy, through `dmr serve` and through `llama-server` started
with Docker Model Runner's arguments (`-ngl 999 --metrics --ctx-size 4096 --jinja`).

    python bench/busy_neighbour.py [--models smollm2,random-0.6b] [--targets dmr,llama-server]
                                   [--tokens 64] [--rounds 3] [--busy N] [--json out.json]

`--busy` is how many spinning processes run beside the server (default: enough to
leave fewer free CPUs than llama.cpp's default thread count, one on 2 cores). The
targets are `dmr` (defaults), `dmr-keep-threads` (`DMR_FREE_CORES=0`: every step
waits at llama.cpp's barriers for a thread without a core; slow, ask few tokens) and
`llama-server`. A round measures each target alone, then with the busy processes;
the figure is the decode rate, (tokens - 1) over the time from the first token to the
last, median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from cpu_share import native_llama_server
from dmr_served import dmr_served
from llamacpp_concurrency import bench_models

SPIN = "import time\nend = time.monotonic() + 3600\nwhile time.monotonic() < end: pass\n"
PROMPT = "Write a long story about a lighthouse keeper and the sea."


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


async def decode_rate(client: httpx.AsyncClient, path: str, model: str, tokens: int) -> float:
    """One streamed chat of `tokens` tokens (ignore_eos): tokens/s after the first."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    times: list[float] = []
    async with client.stream("POST", path, json=body) as answer:
        if answer.status_code != 200:
            raise RuntimeError(f"{answer.status_code}: {(await answer.aread())[:300]!r}")
        async for line in answer.aiter_lines():
            if line.startswith("data: {") and '"content":"' in line.replace(" ", ""):
                times.append(time.perf_counter())
    if len(times) < 2:
        raise RuntimeError(f"{len(times)} token(s) came back")
    return (len(times) - 1) / (times[-1] - times[0])


def llama_server_dmr_args(gguf: Path) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
    """llama-server as Docker Model Runner starts it (its own slot default)."""
    return native_llama_server(gguf, "-ngl", "999", "--metrics", "--ctx-size", "4096", "--jinja")


def store_model(models_path: Path, gguf: Path, tag: str) -> None:
    from dmr.distribution.packaging import PackageOptions, package_gguf, write_to_store
    from dmr.store import Store

    options = PackageOptions(created="2024-11-01T00:00:00Z")
    write_to_store(Store.open(models_path), package_gguf([gguf], options), [tag])


async def measure_model(
    name: str, gguf: Path, args: argparse.Namespace, temp: Path
) -> dict[str, dict[str, float]]:
    chat = "/engines/v1/chat/completions"
    async with contextlib.AsyncExitStack() as stack:
        targets: dict[str, tuple[httpx.AsyncClient, str, str]] = {}
        for target in args.targets:
            if target in ("dmr", "dmr-keep-threads"):
                folder = temp / name / target
                store_model(folder / "models", gguf, "ai/bench")
                env = {"DMR_FREE_CORES": "0"} if target == "dmr-keep-threads" else {}
                base = await stack.enter_async_context(dmr_served(folder, **env))
                client = await stack.enter_async_context(
                    httpx.AsyncClient(base_url=base, timeout=900)
                )
                targets[target] = (client, chat, "ai/bench")
            elif target == "llama-server":
                client = await stack.enter_async_context(llama_server_dmr_args(gguf))
                targets[target] = (client, "/v1/chat/completions", "x")
            else:
                raise SystemExit(f"unknown target {target!r}")
        for client, path, model in targets.values():  # loaded and warm before the clock
            await decode_rate(client, path, model, 8)
        rates: dict[str, dict[str, list[float]]] = {
            target: {"alone": [], "busy": []} for target in targets
        }
        for round_number in range(args.rounds):
            for target, (client, path, model) in targets.items():
                rates[target]["alone"].append(await decode_rate(client, path, model, args.tokens))
                with busy_processes(args.busy):
                    rate = await decode_rate(client, path, model, args.tokens)
                rates[target]["busy"].append(rate)
                print(
                    f"{name} round {round_number + 1} {target}: "
                    f"alone {rates[target]['alone'][-1]:.1f} busy {rate:.1f} tok/s",
                    file=sys.stderr,
                )
    return {
        target: {case: round(statistics.median(values), 1) for case, values in cases.items()}
        for target, cases in rates.items()
    }


def default_busy() -> int:
    from dmr_llamacpp.threads import default_threads

    return max(1, (os.cpu_count() or 1) - default_threads() + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,random-0.6b")
    parser.add_argument("--targets", default="dmr,llama-server")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=None, help="spinning processes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.targets = [target.strip() for target in args.targets.split(",") if target.strip()]
    args.busy = args.busy if args.busy is not None else default_busy()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dmr-busy-") as temp:
        for name, gguf in bench_models(args.models):
            figures[name] = asyncio.run(measure_model(name, gguf, args, Path(temp)))
    print(f"{args.busy} busy process(es) beside the server; decode tokens/s, median")
    print(f"{'model':14} {'target':18} {'alone':>8} {'busy':>8} {'busy÷alone':>11}")
    for name, by_target in figures.items():
        for target, row in by_target.items():
            ratio = row["busy"] / row["alone"]
            print(f"{name:14} {target:18} {row['alone']:8.1f} {row['busy']:8.1f} {ratio:11.2f}")
        if "dmr" in by_target and "llama-server" in by_target:
            ratio = by_target["dmr"]["busy"] / by_target["llama-server"]["busy"]
            print(f"{name:14} dmr ÷ llama-server when busy: {ratio:.2f}")
    if args.json:
        payload = {"args": {**vars(args), "json": str(args.json)}, "figures": figures}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
