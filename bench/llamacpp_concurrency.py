"""Concurrent streaming throughput of the llama.cpp runner against `python -m llama_cpp.server`.

    python bench/llamacpp_concurrency.py [--concurrency 1,4,8] [--max-tokens 64]
           [--targets runner,llama-cpp-server] [--json results.json]

Every target gets the same GGUF (SmolLM2-135M-Instruct Q4_1), the same prompts
and the same number of decode threads. For each concurrency level it reports
aggregate completion tokens/s, TTFT p50 and the tokens each client received.

More targets (for example dmr through its own server) register in `TARGETS`:
a target is an async context manager yielding an `httpx.AsyncClient` whose
base URL answers `POST /v1/chat/completions` (see `dmr_server_target` below).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how bread is made, step by step, in detail.",
    "Describe a journey across the ocean on a sailing ship.",
    "Write a letter to a friend about your summer holidays.",
    "Tell me everything you know about the planet Mars.",
    "Write a long poem about autumn leaves.",
    "Describe a busy market in a small town.",
    "Explain why the sky is blue to a child.",
]

Target = Callable[[argparse.Namespace], contextlib.AbstractAsyncContextManager[httpx.AsyncClient]]


@dataclass
class Round:
    target: str
    concurrency: int
    wall_s: float
    completion_tokens: int
    tokens_per_s: float
    ttft_p50_ms: float
    tokens_per_client: list[int]
    complete_streams: int


async def _wait_healthy(
    client: httpx.AsyncClient, path: str, process: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if (await client.get(path)).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("server did not become healthy")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.asynccontextmanager
async def runner_target(args: argparse.Namespace) -> AsyncIterator[httpx.AsyncClient]:
    """The dmr llama.cpp runner, started as the engine starts it, hit on its unix socket."""
    from dmr.records import AcceleratorInfo, Mode, RunnerConfig, RunnerLaunch
    from dmr_llamacpp.engine import LlamaCppEngine

    with tempfile.TemporaryDirectory(prefix="dmr-bench-") as folder:
        bundle = Path(folder) / "bundle"
        (bundle / "model").mkdir(parents=True)
        (bundle / "model" / "model.gguf").symlink_to(args.gguf)
        launch = RunnerLaunch(
            model_id="sha256:" + "0" * 64,
            model_name="ai/smollm2",
            bundle_dir=bundle,
            model_config={},
            mode=Mode.COMPLETION,
            socket_path=Path(folder) / "runner.sock",
            config=RunnerConfig(
                context_size=args.ctx_size,
                runtime_flags=(
                    "--threads",
                    str(args.threads),
                    "--threads-batch",
                    str(args.threads_batch),
                ),
                engine_options={"llamacpp": {"parallel": max(args.concurrency)}},
            ),
            device=AcceleratorInfo("cpu", "cpu", 0, 0, 0),
        )
        command = LlamaCppEngine().runner_command(launch)
        process = subprocess.Popen(list(command.argv), stderr=subprocess.DEVNULL)  # noqa: ASYNC220
        transport = httpx.AsyncHTTPTransport(uds=str(launch.socket_path))
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://runner", timeout=600
            ) as client:
                await _wait_healthy(client, "/health", process)
                yield client
        finally:
            _stop(process)


# llama.cpp's AMX weight buffers crash on multi-token batches on this kind of CPU
# (see dmr_llamacpp.runner.model); llama_cpp.server gets the same fix dmr uses.
_LLAMA_CPP_SERVER = """
import runpy, sys
import llama_cpp.llama_cpp as low
_default = low.llama_model_default_params
def _params():
    params = _default()
    params.use_extra_bufts = False
    return params
low.llama_model_default_params = _params
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def llama_cpp_server_target(args: argparse.Namespace) -> AsyncIterator[httpx.AsyncClient]:
    """`python -m llama_cpp.server` (needs the llama-cpp-python[server] extra)."""
    port = _free_port()
    argv = [
        sys.executable,
        "-c",
        _LLAMA_CPP_SERVER,
        "--model",
        str(args.gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(args.ctx_size * max(args.concurrency)),
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads_batch),
        "--verbose",
        "False",
    ]
    process = subprocess.Popen(argv, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # noqa: ASYNC220
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            await _wait_healthy(client, "/v1/models", process)
            yield client
    finally:
        _stop(process)


@contextlib.asynccontextmanager
async def dmr_server_target(args: argparse.Namespace) -> AsyncIterator[httpx.AsyncClient]:
    """dmr through its own server, so the proxy's overhead shows against `runner`.

    With DMR_BENCH_SERVER_URL (e.g. http://127.0.0.1:12434/engines) it uses that
    server as it is. Otherwise it starts `dmr serve` on a temporary store, packages
    the GGUF as ai/smollm2 and configures its runner exactly as `runner_target`'s
    (threads, context per slot, slots), so the two differ only by the server.
    """
    url = os.environ.get("DMR_BENCH_SERVER_URL")
    if url:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            yield client
        return
    with tempfile.TemporaryDirectory(prefix="dmr-bench-server-") as folder:
        port = _free_port()
        env = dict(
            os.environ,
            MODELS_PATH=str(Path(folder) / "models"),
            MODEL_RUNNER_PORT=str(port),
            MODEL_RUNNER_HOST=f"http://127.0.0.1:{port}",
        )
        server = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "dmr", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=base, timeout=600) as control:
                await _wait_healthy(control, "/", server)
                subprocess.run(  # noqa: ASYNC221
                    [
                        sys.executable,
                        "-m",
                        "dmr",
                        "package",
                        "--gguf",
                        str(args.gguf),
                        args.model_name,
                    ],
                    env=env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                configured = await control.post(
                    "/engines/_configure",
                    json={
                        "model": args.model_name,
                        "context-size": args.ctx_size,
                        "runtime-flags": [
                            "--threads",
                            str(args.threads),
                            "--threads-batch",
                            str(args.threads_batch),
                        ],
                        "llamacpp": {"parallel": max(args.concurrency)},
                    },
                )
                configured.raise_for_status()
            async with httpx.AsyncClient(base_url=base + "/engines", timeout=600) as client:
                yield client
        finally:
            _stop(server)


TARGETS: dict[str, Target] = {
    "runner": runner_target,
    "llama-cpp-server": llama_cpp_server_target,
    "dmr-server": dmr_server_target,
}


async def one_stream(
    client: httpx.AsyncClient, prompt: str, args: argparse.Namespace, started: float
) -> tuple[float | None, int, bool]:
    """(time to first token, tokens received, whether it ended normally: finish_reason + [DONE])."""
    request: dict[str, Any] = {
        "model": args.model_name,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0.7,
        "seed": 42,
        "stream": True,
    }
    first: float | None = None
    received = 0
    done = False
    finished = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    choices = event.get("choices") or []
                    finished = finished or bool(choices and choices[0].get("finish_reason"))
                    if choices and choices[0].get("delta", {}).get("content"):
                        received += 1
                        first = first if first is not None else time.perf_counter() - started
    except httpx.HTTPError:
        done = False
    return first, received, done and finished and received > 0


async def run_round(
    client: httpx.AsyncClient, name: str, concurrency: int, args: argparse.Namespace
) -> Round:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(one_stream(client, PROMPTS[i % len(PROMPTS)], args, started) for i in range(concurrency))
    )
    wall = time.perf_counter() - started
    tokens = [received for _, received, _ in results]
    ttfts = [first * 1000 for first, _, _ in results if first is not None]
    return Round(
        target=name,
        concurrency=concurrency,
        wall_s=round(wall, 3),
        completion_tokens=sum(tokens),
        tokens_per_s=round(sum(tokens) / wall, 2),
        ttft_p50_ms=round(statistics.median(ttfts), 1) if ttfts else float("nan"),
        tokens_per_client=tokens,
        complete_streams=sum(1 for _, _, done in results if done),
    )


async def main_async(args: argparse.Namespace) -> list[Round]:
    """Every target is started first, then measured in turns: for each round and
    level, each target once, their order reversed every other round. Neighbours'
    load on a shared machine then lands on all targets alike, not on whichever
    happened to run while it lasted."""
    rounds: list[Round] = []
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(TARGETS[name](args)) for name in args.targets
        }
        for client in clients.values():
            await one_stream(client, "Hello", args, time.perf_counter())  # warm-up
        for number in range(args.rounds):
            order = args.targets if number % 2 == 0 else args.targets[::-1]
            for concurrency in args.concurrency:
                for name in order:
                    result = await run_round(clients[name], name, concurrency, args)
                    rounds.append(result)
                    print(
                        f"round {number + 1} {name:18} c={concurrency:<2} "
                        f"{result.tokens_per_s:8.2f} tok/s  TTFT p50 {result.ttft_p50_ms:8.1f} ms  "
                        f"complete {result.complete_streams}/{concurrency}  "
                        f"tokens/client {result.tokens_per_client}",
                        flush=True,
                    )
    print_summary(rounds, args)
    return rounds


def print_summary(rounds: list[Round], args: argparse.Namespace) -> None:
    """Median tokens/s per target and level over the rounds, and the ratios that
    the targets in docs/benchmarks.md are stated in."""
    median: dict[tuple[str, int], float] = {}
    for name in args.targets:
        for concurrency in args.concurrency:
            figures = [
                r.tokens_per_s for r in rounds if r.target == name and r.concurrency == concurrency
            ]
            median[name, concurrency] = statistics.median(figures)
            incomplete = sum(
                r.concurrency - r.complete_streams
                for r in rounds
                if r.target == name and r.concurrency == concurrency
            )
            print(
                f"median {name:18} c={concurrency:<2} {median[name, concurrency]:8.2f} tok/s"
                f"  incomplete streams {incomplete}"
            )
    if "runner" in args.targets and "dmr-server" in args.targets:
        for concurrency in args.concurrency:
            ratio = median["dmr-server", concurrency] / median["runner", concurrency]
            print(f"dmr-server / runner at c={concurrency}: {ratio:.3f}")
    low, high = min(args.concurrency), max(args.concurrency)
    for name in args.targets:
        print(f"{name}: c={high} / c={low} = {median[name, high] / median[name, low]:.2f}x")


def main() -> None:
    from dmr.samples import ensure_smollm2_gguf

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ctx-size", type=int, default=512, help="tokens per slot")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--threads-batch", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--targets", default="runner,llama-cpp-server")
    parser.add_argument("--model-name", default="ai/smollm2")
    parser.add_argument("--rounds", type=int, default=1, help="measure every level this often")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.gguf = args.gguf or ensure_smollm2_gguf()
    args.concurrency = [int(part) for part in args.concurrency.split(",")]
    args.targets = [part for part in args.targets.split(",") if part]
    rounds = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps([asdict(item) for item in rounds], indent=2))


if __name__ == "__main__":
    main()
