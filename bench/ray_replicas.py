"""Replicas on a Ray cluster: one `dmr serve` over a local two-node cluster whose
nodes each declare one CPU (so each runner computes with one thread), SmolLM2 with
one replica against the same model with two (`replicas: 2`, one per node).

    python bench/ray_replicas.py [--streams 8,16] [--max-tokens 64] [--rounds 3]
                                 [--json out.json]

Each round streams N chats at once (each its own question, as N users would) to each
case and measures the aggregate tokens/s (every stream's tokens over the wall time
from the first request to the last token) and the slowest stream. The peers are
native llama-servers with one thread each and a slot per stream: one (what one node
serves) and two with the streams dealt out between them (the most two one-CPU nodes
on this machine can give). Cases take turns round by round; the figures are medians.
The store is shared with the nodes (one machine), so no registry is needed. Target
(docs/benchmarks.md): two replicas >= 1.6 times one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
from cpu_share import PROMPT, llama_server, stream
from dmr.testing import free_port, sample_gguf
from dmr_served import dmr_served

MODELS = {"one replica": "ai/smollm2-one", "two replicas": "ai/smollm2-two"}
CHAT = "/engines/v1/chat/completions"
NODE_MEMORY = 4_000_000_000


@contextlib.contextmanager
def local_cluster() -> Iterator[str]:
    """Two `ray start` nodes on this machine, one CPU each; the address."""
    temp_dir = Path(tempfile.mkdtemp(prefix="dmr-ray-"))
    address = f"127.0.0.1:{free_port()}"
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "DMR_RAY_RUNNER_HOST": "127.0.0.1"}
    node = ["--num-cpus", "1", "--memory", str(NODE_MEMORY), "--disable-usage-stats"]
    try:
        for args in (
            ["--head", "--port", address.rsplit(":", 1)[1], "--temp-dir", str(temp_dir),
             "--include-dashboard", "false"],
            ["--address", address],
        ):  # fmt: skip
            subprocess.run([ray, "start", *args, *node], env=env, check=True, capture_output=True)
        yield address
    finally:
        ours = []
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(str(temp_dir) in part for part in process.info["cmdline"] or ()):
                    ours.append(process)
        for process in ours:
            with contextlib.suppress(psutil.Error):
                process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def store_models(models_path: Path, gguf: Path) -> None:
    from dmr.distribution.packaging import PackageOptions, package_gguf, write_to_store
    from dmr.store import Store

    store = Store.open(models_path)
    for n, tag in enumerate(MODELS.values()):
        options = PackageOptions(created=f"2024-11-0{n + 1}T00:00:00Z", context_size=4096)
        write_to_store(store, package_gguf([gguf], options), [tag])


async def chat(client: httpx.AsyncClient, path: str, model: str, tokens: int, n: int) -> float:
    """One streamed chat (ignore_eos), its own question: `n` users, `n` conversations."""
    return await stream(client, path, model, tokens, f"{PROMPT} Reader number {n}.")


def round_of(
    targets: list[tuple[httpx.AsyncClient, str, str]], streams: int, tokens: int
) -> Callable[[], Awaitable[dict[str, float]]]:
    """`streams` chats at once, dealt out over `targets` in turn."""

    async def run() -> dict[str, float]:
        began = time.perf_counter()
        rates = await asyncio.gather(
            *(chat(*targets[n % len(targets)], tokens, n) for n in range(streams))
        )
        wall = time.perf_counter() - began
        return {"aggregate": streams * tokens / wall, "slowest": min(rates)}

    return run


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    gguf = sample_gguf()
    cases: dict[str, Callable[[], Awaitable[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="dmr-ray-bench-") as temp, local_cluster() as address:
        async with contextlib.AsyncExitStack() as stack:
            store_models(Path(temp) / "models", gguf)
            base = await stack.enter_async_context(
                dmr_served(Path(temp), DMR_RAY_ADDRESS=address, DMR_RAY_SHARED_STORE="1")
            )
            client = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=600))
            answer = await client.post(
                "/engines/_configure", json={"model": MODELS["two replicas"], "replicas": 2}
            )
            answer.raise_for_status()
            for model in MODELS.values():
                await chat(client, CHAT, model, 2, 0)  # loaded before the clock runs
            placed = (await client.get("/engines/ps")).json()
            print(f"runners: {[(r['model_name'], r['device']) for r in placed]}", file=sys.stderr)
            peers = [
                await stack.enter_async_context(llama_server(gguf, max(args.streams), threads=1))
                for _ in range(2)
            ]
            for peer in peers:
                await chat(peer, "/v1/chat/completions", "x", 2, 0)
            native = [(peer, "/v1/chat/completions", "x") for peer in peers]
            for streams in args.streams:
                for name, model in MODELS.items():
                    cases[f"{name}, {streams} streams"] = round_of(
                        [(client, CHAT, model)], streams, args.max_tokens
                    )
                for count, label in ((1, "one llama-server"), (2, "two llama-servers")):
                    cases[f"{label}, 1 thread each, {streams} streams"] = round_of(
                        native[:count], streams, args.max_tokens
                    )
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
    parser.add_argument(
        "--streams", default="8,16", help="streams at once, comma-separated (one case each)"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.streams = [int(n) for n in args.streams.split(",")]
    figures = asyncio.run(main_async(args))
    print(f"{'target':44} {'aggregate tok/s':>16} {'slowest stream':>15} {'÷ one replica':>14}")
    for name, row in figures.items():
        streams = name.rsplit(", ", 1)[1]
        ratio = row["aggregate"] / figures[f"one replica, {streams}"]["aggregate"]
        print(f"{name:44} {row['aggregate']:16.1f} {row['slowest']:15.1f} {ratio:14.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "figures": figures}, indent=2
            )
        )


if __name__ == "__main__":
    main()
