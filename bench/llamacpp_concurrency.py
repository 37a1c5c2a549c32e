"""dmr's llama.cpp serving against llama.cpp's own `llama-server`, side by side.

    python bench/llamacpp_concurrency.py [--targets llama-server,dmr-server]
           [--concurrency 1,4,8,16] [--cases streams,long,multiturn] [--rounds 6]
           [--max-tokens 96] [--json results.json]

Targets (register more in `TARGETS`; each yields an `httpx.AsyncClient` whose base
URL answers `POST /v1/chat/completions`):

- `llama-server`: the native binary from `scripts/build-llama-server` (or
  `LLAMA_SERVER_PATH`), the yardstick: Docker Model Runner serves GGUF with it.
  It gets dmr's default slots and context (`--parallel 8 -c 8*4096`), `--jinja`,
  its weight repacking exactly where dmr's runner uses the same extra buffers
  (`--no-repack` elsewhere: docs/scheduler.md) and its own thread defaults.
- `dmr-server`: `dmr serve` on a temporary store with the GGUF packaged as
  `ai/smollm2`, **default settings** but the context, configured to the same
  4096 per slot (dmr's own default follows the memory), hit over TCP.
- `llama-server-dmr`: the same binary as Docker Model Runner starts it (`-ngl 999
  --metrics --ctx-size 4096 --jinja`, llama-server's own slot default).
- `runner`: the dmr runner alone on its unix socket, as the engine starts it.
- `llama-cpp-server`: `python -m llama_cpp.server`, the weakest peer.

With `dmr-server` among the targets, the others map the copy of the GGUF that its
store holds, so every server reads the same file in the same page-cache state
(`--separate-files`: each maps `--gguf` itself).

`--threads/--threads-batch` pin every target's threads; by default each keeps its own.
`--gpu-layers N` offloads layers where a GPU exists (same figure for every target);
`--llama-server-flags "-ngl 999 --metrics"` gives llama-server alone Docker Model
Runner's GPU arguments, for a `dmr serve` left to its own GPU probe (scripts/gpu-check).

`--models smollm2,random-0.6b,random-gemma3,NAME=PATH` measures several models in one
run, one after the other (random-0.6b: a ~0.6B Q8_0 llama; random-gemma3: Gemma 3
270M's shapes and sliding-window attention; both written once by bench/random_gguf.py
with SmolLM2's vocabulary and random weights).
A case that stalls past `--round-timeout` seconds is reported with what it asked and
left out of the medians.

Cases, each measured for every target in interleaved rounds (the order of the
targets reversed every other round) and reported as medians over rounds:

- `streams`: N clients stream a chat answer at once (temperature 0, `--max-tokens`):
  aggregate tokens/s, TTFT p50 and p95, complete streams.
- `long`: one request whose prompt has more than 1,500 tokens (a new nonce at its
  start every round, so no cache can hold it): TTFT and prompt processing
  tokens/s (prompt tokens ÷ TTFT).
- `multiturn`: a conversation whose every turn resends the growing history with the
  previous answer in it; TTFT of turns 2 and later, where prefix reuse shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from dmr.testing import free_port, stop_process

REPO = Path(__file__).resolve().parents[1]

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

TURNS = [
    "Tell me about the history of tea.",
    "How is green tea different from black tea?",
    "Which countries grow the most tea today?",
    "How should I brew a good cup of oolong?",
    "What snacks go well with it?",
    "Summarise our conversation in three sentences.",
]

Target = Callable[[argparse.Namespace], contextlib.AbstractAsyncContextManager[httpx.AsyncClient]]


@dataclass
class Measurement:
    target: str
    case: str  # "streams" | "long" | "multiturn"
    concurrency: int
    round: int
    wall_s: float
    completion_tokens: int
    tokens_per_s: float
    ttft_ms: list[float]
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    complete_streams: int = 0
    texts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ttft_p50_ms(self) -> float:
        return statistics.median(self.ttft_ms) if self.ttft_ms else math.nan

    @property
    def ttft_p95_ms(self) -> float:
        return _percentile(self.ttft_ms, 95)


def _percentile(values: list[float], percent: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, math.ceil(percent / 100 * len(ordered)) - 1)
    return ordered[rank]


# ---------------------------------------------------------------------------- targets


# No connection is kept between requests: llama-server closes one after a streamed
# answer, and a request sent right after (its warm-up, or its previous case when the
# order of the targets flips between rounds) went out on that closing connection and
# failed with "Server disconnected". Every target opens a connection per request
# alike (well under a millisecond on 127.0.0.1).
FRESH_CONNECTIONS = httpx.Limits(max_keepalive_connections=0)


async def _wait_healthy(
    client: httpx.AsyncClient, path: str, process: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 300
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


def _thread_flags(args: argparse.Namespace) -> list[str]:
    flags: list[str] = []
    if args.threads:
        flags += ["--threads", str(args.threads)]
    if args.threads_batch:
        flags += ["--threads-batch", str(args.threads_batch)]
    if args.gpu_layers:
        flags += ["--n-gpu-layers", str(args.gpu_layers)]
    return flags


@contextlib.asynccontextmanager
async def _served_on_tcp(
    argv: list[str], port: int, health_path: str, env: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """Start a server process listening on 127.0.0.1:`port` (with `env` added to this
    process's environment); a client once it is healthy."""
    process = subprocess.Popen(  # noqa: ASYNC220
        argv,
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=None if env is None else {**os.environ, **env},
    )
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=600, limits=FRESH_CONNECTIONS
        ) as client:
            await _wait_healthy(client, health_path, process)
            yield client
    finally:
        stop_process(process)


# The yardstick's binary, from LLAMA_SERVER_PATH: `main` takes it out of the
# environment, where it would make every dmr target run the native server instead of
# dmr's own runner (docs/scheduler.md, "Native llama-server").
_LLAMA_SERVER_PATH = os.environ.pop("LLAMA_SERVER_PATH", None)


def llama_server_binary() -> Path:
    if _LLAMA_SERVER_PATH:
        return Path(_LLAMA_SERVER_PATH)
    built = subprocess.run(
        [str(REPO / "scripts" / "build-llama-server")], capture_output=True, text=True, check=True
    )
    return Path(built.stdout.strip().splitlines()[-1])


def repack_flags(gguf: Path) -> list[str]:
    """llama-server's weight repacking (AMX on this kind of CPU) exactly where dmr's
    runner uses the same extra buffers (docs/scheduler.md, "Extra weight buffers"), so
    both compute with the same kernels; `--no-repack` where the installed llama.cpp
    build crashes with them."""
    from dmr_llamacpp.runner.extra_buffers import extra_buffers_usable

    return [] if extra_buffers_usable(gguf) else ["--no-repack"]


def model_file(args: argparse.Namespace) -> Path:
    """The GGUF a target other than `dmr serve` maps: the copy in dmr's store once the
    dmr-server target has packaged it, so that every server reads the same file in
    the same page-cache state (a file just written is slower to compute from for a
    while: docs/benchmarks.md, "The first step after an idle spell"); else `--gguf`."""
    served: Path | None = getattr(args, "served_gguf", None)
    return served or args.gguf


def _stored_gguf(models_path: Path, model_name: str) -> Path:
    from dmr.store import Store
    from dmr_llamacpp.bundle import find_gguf_bundle

    return find_gguf_bundle(Store.open(models_path).get(model_name).bundle_dir).model


@contextlib.asynccontextmanager
async def _llama_server(
    args: argparse.Namespace, flags: list[str], env: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The native binary on the bench's GGUF and a free port, with `flags`, `--jinja`,
    `repack_flags` and the pinned threads."""
    port = free_port()
    argv = [
        str(llama_server_binary()),
        *("--model", str(model_file(args)), "--host", "127.0.0.1", "--port", str(port)),
        *flags,
        "--jinja",
        *repack_flags(model_file(args)),
        *_thread_flags(args),
    ]
    async with _served_on_tcp(argv, port, "/health", env) as client:
        yield client


@contextlib.asynccontextmanager
async def llama_server_target(args: argparse.Namespace) -> AsyncIterator[httpx.AsyncClient]:
    """llama.cpp's native server with dmr's default slots and context per slot."""
    slots = ["--parallel", str(args.parallel), "--ctx-size", str(args.ctx_size * args.parallel)]
    async with _llama_server(args, [*slots, *shlex.split(args.llama_server_flags)]) as client:
        yield client


@contextlib.asynccontextmanager
async def llama_server_huge_pages_target(
    args: argparse.Namespace,
) -> AsyncIterator[httpx.AsyncClient]:
    """The tuned llama-server with its weights placed as dmr's CPU runners place theirs:
    read into memory (`--load-mode none`) with glibc's huge-page tunable (plugins/llamacpp's
    huge_pages.py). Not a target of the issue: it shows how much of dmr's lead is
    that placement, which any llama-server user could choose too."""
    from dmr_llamacpp.huge_pages import huge_page_env

    slots = ["--parallel", str(args.parallel), "--ctx-size", str(args.ctx_size * args.parallel)]
    flags = [*slots, "--load-mode", "none", *shlex.split(args.llama_server_flags)]
    async with _llama_server(args, flags, huge_page_env(os.environ)) as client:
        yield client


@contextlib.asynccontextmanager
async def llama_server_dmr_target(args: argparse.Namespace) -> AsyncIterator[httpx.AsyncClient]:
    """llama-server as Docker Model Runner starts it: `-ngl 999 --metrics --ctx-size 4096
    --jinja` and llama-server's own slot default (`-np` auto: 4 slots over one unified
    KV pool)."""
    dmr_flags = ["-ngl", "999", "--metrics", "--ctx-size", str(args.ctx_size)]
    async with _llama_server(args, dmr_flags) as client:
        yield client


@contextlib.asynccontextmanager
async def runner_target(args: argparse.Namespace) -> AsyncIterator[httpx.AsyncClient]:
    """The dmr llama.cpp runner, started as the engine starts it, hit on its unix socket."""
    from dmr.records import AcceleratorInfo, Mode, RunnerConfig, RunnerLaunch
    from dmr_llamacpp.engine import LlamaCppEngine

    with tempfile.TemporaryDirectory(prefix="dmr-bench-") as folder:
        bundle = Path(folder) / "bundle"
        (bundle / "model").mkdir(parents=True)
        (bundle / "model" / "model.gguf").symlink_to(model_file(args))
        launch = RunnerLaunch(
            model_id="sha256:" + "0" * 64,
            model_name=args.model_name,
            bundle_dir=bundle,
            model_config={},
            mode=Mode.COMPLETION,
            socket_path=Path(folder) / "runner.sock",
            config=RunnerConfig(
                context_size=args.ctx_size,
                runtime_flags=tuple(_thread_flags(args)),
                engine_options={"llamacpp": {"parallel": args.parallel}},
            ),
            device=AcceleratorInfo("cpu", "cpu", 0, 0, 0),
        )
        command = LlamaCppEngine().runner_command(launch)
        process = subprocess.Popen(list(command.argv), stderr=subprocess.DEVNULL)  # noqa: ASYNC220
        transport = httpx.AsyncHTTPTransport(uds=str(launch.socket_path))
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://runner", timeout=600, limits=FRESH_CONNECTIONS
            ) as client:
                await _wait_healthy(client, "/health", process)
                yield client
        finally:
            stop_process(process)


# llama.cpp's extra (AMX) weight buffers crash with some builds (GCC 12) on batches of
# several tokens; llama_cpp.server uses them exactly where dmr's runner does
# (dmr_llamacpp.runner.extra_buffers).
_LLAMA_CPP_SERVER = """
import runpy, sys
from pathlib import Path
import llama_cpp.llama_cpp as low
from dmr_llamacpp.runner.extra_buffers import extra_buffers_usable
_default = low.llama_model_default_params
_extra = extra_buffers_usable(Path(sys.argv[sys.argv.index("--model") + 1]))
def _params():
    params = _default()
    params.use_extra_bufts = _extra
    return params
low.llama_model_default_params = _params
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


@contextlib.asynccontextmanager
async def llama_cpp_server_target(args: argparse.Namespace) -> AsyncIterator[httpx.AsyncClient]:
    """`python -m llama_cpp.server` (needs the llama-cpp-python[server] extra)."""
    port = free_port()
    argv = [
        sys.executable,
        "-c",
        _LLAMA_CPP_SERVER,
        "--model",
        str(model_file(args)),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(args.ctx_size * args.parallel),
        "--verbose",
        "False",
    ]
    if args.threads:
        argv += ["--n_threads", str(args.threads)]
    if args.threads_batch:
        argv += ["--n_threads_batch", str(args.threads_batch)]
    async with _served_on_tcp(argv, port, "/v1/models") as client:
        yield client


@contextlib.asynccontextmanager
async def dmr_server_target(args: argparse.Namespace) -> AsyncIterator[httpx.AsyncClient]:
    """`dmr serve` as a user runs it: default settings, the GGUF packaged as a model.

    With DMR_BENCH_SERVER_URL (e.g. http://127.0.0.1:12434/engines) it uses that
    server as it is. Only flags given to this bench (threads, GPU layers, a context
    or slot count other than dmr's defaults) are configured through `_configure`.
    """
    url = os.environ.get("DMR_BENCH_SERVER_URL")
    if url:
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=FRESH_CONNECTIONS) as client:
            yield client
        return
    with tempfile.TemporaryDirectory(prefix="dmr-bench-server-") as folder:
        port = free_port()
        env = dict(
            os.environ,
            MODELS_PATH=str(Path(folder) / "models"),
            MODEL_RUNNER_PORT=str(port),
            MODEL_RUNNER_HOST=f"http://127.0.0.1:{port}",
        )
        log: Any = subprocess.DEVNULL
        if args.dmr_artifacts:
            args.dmr_artifacts.mkdir(parents=True, exist_ok=True)
            log = (args.dmr_artifacts / "dmr-server.log").open("wb")
        server = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "dmr", "serve"], env=env, stdout=log, stderr=log
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
                if not args.separate_files:
                    args.served_gguf = _stored_gguf(Path(folder) / "models", args.model_name)
                configure: dict[str, Any] = {}
                if _thread_flags(args):
                    configure["runtime-flags"] = _thread_flags(args)
                # Always: dmr's default context follows the trained context and the
                # memory (docs/scheduler.md), and the servers compared must match.
                configure["context-size"] = args.ctx_size
                if args.parallel != DMR_DEFAULT_PARALLEL:
                    configure["llamacpp"] = {"parallel": args.parallel}
                if configure:
                    answer = await control.post(
                        "/engines/_configure", json={"model": args.model_name, **configure}
                    )
                    answer.raise_for_status()
            async with httpx.AsyncClient(
                base_url=base + "/engines", timeout=600, limits=FRESH_CONNECTIONS
            ) as client:
                yield client
                if args.dmr_artifacts:
                    # The runners' own series (step and decode seconds among them) and
                    # what the server saw: where a step's time went, read after the run.
                    for name, path in [
                        ("metrics.txt", "/metrics"),
                        ("ps.json", "/engines/ps"),
                        ("hardware.json", "/engines/hardware"),
                    ]:
                        answer = await client.get(base + path)
                        (args.dmr_artifacts / name).write_bytes(answer.content)
        finally:
            stop_process(server)


DMR_DEFAULT_CTX = 4096  # tokens per slot, as llama-server is given
DMR_DEFAULT_PARALLEL = 8

TARGETS: dict[str, Target] = {
    "llama-server": llama_server_target,
    "llama-server-dmr": llama_server_dmr_target,
    "llama-server-huge-pages": llama_server_huge_pages_target,
    "dmr-server": dmr_server_target,
    "runner": runner_target,
    "llama-cpp-server": llama_cpp_server_target,
}


# ---------------------------------------------------------------------------- requests


@dataclass
class StreamResult:
    ttft_s: float | None
    chunks: int
    complete: bool
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: str = ""


async def one_stream(
    client: httpx.AsyncClient,
    messages: list[dict[str, str]],
    args: argparse.Namespace,
    max_tokens: int,
    *,
    path: str = "/v1/chat/completions",
) -> StreamResult:
    """Stream one chat answer to `args.model_name`; TTFT is measured to the first chunk
    with content."""
    request: dict[str, Any] = {
        "model": args.model_name,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    done = finished = False
    try:
        async with client.stream("POST", path, json=request) as response:
            if response.status_code != 200:
                error = (await response.aread()).decode(errors="replace")[:300]
                return StreamResult(None, 0, False, "", 0, 0, 0, f"{response.status_code} {error}")
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return StreamResult(
                            first, len(parts), False, "".join(parts), 0, 0, 0, str(event["error"])
                        )
                    usage = event.get("usage") or usage
                    choices = event.get("choices") or []
                    finished = finished or bool(choices and choices[0].get("finish_reason"))
                    content = choices[0].get("delta", {}).get("content") if choices else None
                    if content:
                        parts.append(content)
                        if first is None:
                            first = time.perf_counter() - started
    except httpx.HTTPError as error:
        return StreamResult(first, len(parts), False, "".join(parts), 0, 0, 0, repr(error))
    details = usage.get("prompt_tokens_details") or {}
    return StreamResult(
        ttft_s=first,
        chunks=len(parts),
        complete=done and finished and bool(parts),
        text="".join(parts),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or len(parts)),
        cached_tokens=int(details.get("cached_tokens") or 0),
    )


def _measurement(
    name: str,
    case: str,
    number: int,
    results: list[StreamResult],
    wall: float,
) -> Measurement:
    tokens = sum(result.completion_tokens for result in results)
    return Measurement(
        target=name,
        case=case,
        concurrency=len(results),
        round=number,
        wall_s=round(wall, 3),
        completion_tokens=tokens,
        tokens_per_s=round(tokens / wall, 2),
        ttft_ms=[round(r.ttft_s * 1000, 1) for r in results if r.ttft_s is not None],
        prompt_tokens=[r.prompt_tokens for r in results],
        cached_tokens=[r.cached_tokens for r in results],
        complete_streams=sum(r.complete for r in results),
        texts=[r.text for r in results],
        errors=[r.error for r in results if r.error],
    )


async def streams_case(
    client: httpx.AsyncClient, name: str, number: int, concurrency: int, args: argparse.Namespace
) -> Measurement:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            one_stream(
                client,
                [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                args,
                args.max_tokens,
            )
            for i in range(concurrency)
        )
    )
    return _measurement(name, "streams", number, list(results), time.perf_counter() - started)


def long_prompt(nonce: str, sentences: int = 64) -> str:
    """A prompt of about 1,750 tokens (SmolLM2's tokenizer) whose first words differ every call."""
    colours = ["red", "green", "blue", "amber", "violet", "silver", "golden", "grey"]
    things = ["lantern", "harbour", "orchard", "bridge", "library", "garden", "tower", "river"]
    lines = [f"Reference {nonce}. Read these notes, then answer the question at the end."]
    for index in range(sentences):
        colour, thing = colours[index % len(colours)], things[(index * 3) % len(things)]
        lines.append(
            f"Note {index + 1}: the {colour} {thing} was visited on day {index * 7 % 31 + 1} "
            f"by {index % 5 + 2} travellers who counted {index * 13 % 97} stones."
        )
    lines.append("Question: which colours appear in the notes? Answer briefly.")
    return "\n".join(lines)


async def long_case(
    client: httpx.AsyncClient, name: str, number: int, args: argparse.Namespace
) -> Measurement:
    messages = [{"role": "user", "content": long_prompt(uuid.uuid4().hex)}]
    started = time.perf_counter()
    result = await one_stream(client, messages, args, 16)
    return _measurement(name, "long", number, [result], time.perf_counter() - started)


async def multiturn_case(
    client: httpx.AsyncClient, name: str, number: int, args: argparse.Namespace
) -> Measurement:
    """TTFT of turns 2.. of a conversation that resends its history every turn."""
    messages: list[dict[str, str]] = [
        {"role": "system", "content": f"Conversation {uuid.uuid4().hex}. Be helpful and brief."}
    ]
    results: list[StreamResult] = []
    started = time.perf_counter()
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        result = await one_stream(client, messages, args, args.turn_tokens)
        messages.append({"role": "assistant", "content": result.text})
        results.append(result)
    measured = _measurement(name, "multiturn", number, results[1:], time.perf_counter() - started)
    measured.concurrency = 1
    return measured


# ---------------------------------------------------------------------------- running


async def main_async(args: argparse.Namespace) -> list[Measurement]:
    """Every target is started first, then measured in turns: for each round, case
    and level, each target once, their order reversed every other round, so a
    neighbour's load on a shared machine lands on all targets alike."""
    measurements: list[Measurement] = []
    args.served_gguf = None
    async with contextlib.AsyncExitStack() as stack:
        # dmr serve first: the others then map its store's copy (`model_file`).
        starting = sorted(args.targets, key=lambda name: name != "dmr-server")
        clients = {name: await stack.enter_async_context(TARGETS[name](args)) for name in starting}
        for client in clients.values():  # warm-up: loads the model, fills caches
            await one_stream(client, [{"role": "user", "content": "Hello"}], args, 8)
        for number in range(1, args.rounds + 1):
            order = args.targets if number % 2 else args.targets[::-1]
            for case in args.cases:
                levels = args.concurrency if case == "streams" else [1]
                for concurrency in levels:
                    for name in order:
                        result = await _timed_case(
                            clients[name], name, case, number, concurrency, args
                        )
                        measurements.append(result)
                        print(_line(result), flush=True)
    print()
    print(summary(measurements, args))
    return measurements


async def _timed_case(
    client: httpx.AsyncClient,
    name: str,
    case: str,
    number: int,
    concurrency: int,
    args: argparse.Namespace,
) -> Measurement:
    """One case for one target, given up after `--round-timeout` seconds: a round that
    stalls is reported with what it asked and, having no complete stream, left out of
    the medians (`summary`) instead of holding the whole run."""
    try:
        if case == "streams":
            call = streams_case(client, name, number, concurrency, args)
        elif case == "long":
            call = long_case(client, name, number, args)
        else:
            call = multiturn_case(client, name, number, args)
        return await asyncio.wait_for(call, timeout=args.round_timeout)
    except TimeoutError:
        asked = f"{case}, {concurrency} stream(s), max_tokens {args.max_tokens}"
        return Measurement(
            target=name,
            case=case,
            concurrency=concurrency,
            round=number,
            wall_s=args.round_timeout,
            completion_tokens=0,
            tokens_per_s=0.0,
            ttft_ms=[],
            texts=[""] * concurrency,
            errors=[f"stalled: no whole answer within {args.round_timeout:.0f} s ({asked})"],
        )


def _line(m: Measurement) -> str:
    extra = ""
    if m.case != "streams":
        extra = f"  prompt {m.prompt_tokens}  cached {m.cached_tokens}"
    if m.errors:
        extra += f"  errors {m.errors[:2]}"
    return (
        f"round {m.round} {m.case:9} {m.target:16} c={m.concurrency:<2} "
        f"{m.tokens_per_s:8.2f} tok/s  TTFT p50 {m.ttft_p50_ms:7.1f} ms "
        f"p95 {m.ttft_p95_ms:7.1f} ms  complete {m.complete_streams}/{len(m.texts)}{extra}"
    )


def _fmt(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _median(values: list[float]) -> float:
    values = [value for value in values if not math.isnan(value)]
    return statistics.median(values) if values else math.nan


def _prompt_rate(m: Measurement) -> float:
    """Prompt tokens processed per second before the first token (the long case)."""
    if m.case != "long" or not m.ttft_ms or not m.prompt_tokens[0]:
        return math.nan
    return (m.prompt_tokens[0] - m.cached_tokens[0]) / (m.ttft_ms[0] / 1000)


def summary(measurements: list[Measurement], args: argparse.Namespace) -> str:
    """Medians per target, case and level, then dmr ÷ llama-server with the targets."""
    rows: dict[tuple[str, str, int], dict[str, float]] = {}
    for m in measurements:
        key = (m.target, m.case, m.concurrency)
        rows.setdefault(key, {})
    for key in rows:
        every = [m for m in measurements if (m.target, m.case, m.concurrency) == key]
        # A round with a broken stream says nothing about speed; it is counted apart.
        chosen = [m for m in every if m.complete_streams == len(m.texts)] or every
        rows[key] = {
            "tokens_per_s": _median([m.tokens_per_s for m in chosen]),
            "ttft_p50_ms": _median([m.ttft_p50_ms for m in chosen]),
            "ttft_p95_ms": _median([m.ttft_p95_ms for m in chosen]),
            "prompt_per_s": _median([_prompt_rate(m) for m in chosen]),
            "incomplete": sum(len(m.texts) - m.complete_streams for m in every),
            "cached": _median([float(sum(m.cached_tokens)) for m in chosen]),
        }
    lines = [
        "| target | case | streams | tok/s | TTFT p50 ms | TTFT p95 ms | prompt tok/s "
        "| incomplete |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (target, case, level), row in sorted(rows.items()):
        lines.append(
            f"| {target} | {case} | {level} | {row['tokens_per_s']:.1f} | "
            f"{row['ttft_p50_ms']:.0f} | {row['ttft_p95_ms']:.0f} | "
            f"{_fmt(row['prompt_per_s'])} | {int(row['incomplete'])} |"
        )
    base, ours = "llama-server", args.compare
    if base in args.targets and ours in args.targets:
        lines += ["", f"{ours} ÷ {base} (medians over {args.rounds} rounds):", ""]
        lines += [
            "| case | streams | tok/s ratio | TTFT p50 (ours / base) | "
            "TTFT p95 (ours / base) | prompt tok/s ratio |",
            "|---|---|---|---|---|---|",
        ]
        for (target, case, level), row in sorted(rows.items()):
            if target != ours or (base, case, level) not in rows:
                continue
            ref = rows[base, case, level]
            lines.append(
                f"| {case} | {level} | {_ratio(row['tokens_per_s'], ref['tokens_per_s']):.2f} | "
                f"{row['ttft_p50_ms']:.0f} / {ref['ttft_p50_ms']:.0f} ms | "
                f"{row['ttft_p95_ms']:.0f} / {ref['ttft_p95_ms']:.0f} ms | "
                f"{_fmt(_ratio(row['prompt_per_s'], ref['prompt_per_s']), 2)} |"
            )
        lines += ["", *_target_checks(rows, ours, base)]
    return "\n".join(lines)


def _target_checks(
    rows: dict[tuple[str, str, int], dict[str, float]], ours: str, base: str
) -> list[str]:
    """Issue 28's targets (docs/benchmarks.md), each as met / missed with the figures
    behind it; the long-prompt and multi-turn ones are issue 12's."""
    checks: list[str] = []

    def check(label: str, ok: bool, detail: str) -> None:
        checks.append(f"- {'met' if ok else 'MISSED'}: {label} ({detail})")

    def pair(case: str, level: int) -> tuple[dict[str, float], dict[str, float]] | None:
        if (ours, case, level) in rows and (base, case, level) in rows:
            return rows[ours, case, level], rows[base, case, level]
        return None

    for level in (1, 8):
        if found := pair("streams", level):
            mine, ref = found
            ratio = _ratio(mine["tokens_per_s"], ref["tokens_per_s"])
            check(f"tokens/s at {level} stream(s) >= 0.97x", ratio >= 0.97, f"{ratio:.2f}x")
    if found := pair("streams", 1):
        mine, ref = found
        gap = mine["ttft_p50_ms"] - ref["ttft_p50_ms"]
        check("TTFT p50 at 1 stream <= llama-server + 10 ms", gap <= 10, f"{gap:+.0f} ms")
    if found := pair("streams", 8):
        mine, ref = found
        ratio = _ratio(mine["ttft_p50_ms"], ref["ttft_p50_ms"])
        check("TTFT p50 at 8 streams <= 1.2x", ratio <= 1.2, f"{ratio:.2f}x")
        # More streams than slots: against llama-server's best, all 8 slots busy.
        for level in (16, 32):
            if (ours, "streams", level) in rows:
                ratio = _ratio(rows[ours, "streams", level]["tokens_per_s"], ref["tokens_per_s"])
                check(
                    f"tokens/s at {level} streams >= 1.2x llama-server's at 8",
                    ratio >= 1.2,
                    f"{ratio:.2f}x",
                )
    if found := pair("long", 1):
        mine, ref = found
        ratio = _ratio(mine["prompt_per_s"], ref["prompt_per_s"])
        check("long-prompt processing >= 0.95x", ratio >= 0.95, f"{ratio:.2f}x")
    if found := pair("multiturn", 1):
        mine, ref = found
        ratio = _ratio(mine["ttft_p50_ms"], ref["ttft_p50_ms"])
        check("multi-turn TTFT <= 1.2x", ratio <= 1.2, f"{ratio:.2f}x")
    return checks


def main() -> None:
    from dmr.sample_model import ensure_smollm2_gguf

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument(
        "--models",
        default="",
        help="several models in one run, each measured in turn: smollm2, random-0.6b, "
        "random-gemma3 (written once by bench/random_gguf.py), or NAME=PATH to a GGUF",
    )
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=600.0,
        help="seconds before a stalled case is given up, reported and left out",
    )
    parser.add_argument("--targets", default="llama-server,dmr-server")
    parser.add_argument(
        "--compare", default="dmr-server", help="the target set against llama-server"
    )
    parser.add_argument("--cases", default="streams,long,multiturn")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument(
        "--turn-tokens", type=int, default=48, help="max tokens per multi-turn answer"
    )
    parser.add_argument("--ctx-size", type=int, default=DMR_DEFAULT_CTX, help="tokens per slot")
    parser.add_argument("--parallel", type=int, default=DMR_DEFAULT_PARALLEL, help="slots")
    parser.add_argument("--threads", type=int, default=None, help="default: each target's own")
    parser.add_argument("--threads-batch", type=int, default=None)
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument(
        "--llama-server-flags",
        default="",
        help="more flags for llama-server alone, e.g. Docker Model Runner's '-ngl 999 --metrics'",
    )
    parser.add_argument("--model-name", default="ai/smollm2")
    parser.add_argument(
        "--separate-files",
        action="store_true",
        help="the other targets map --gguf itself, not the copy dmr serve's store holds",
    )
    parser.add_argument(
        "--dmr-artifacts",
        type=Path,
        help="keep dmr serve's log, /metrics, /engines/ps and /engines/hardware here",
    )
    parser.add_argument(
        "--rounds", type=int, default=6, help="measure every case this often (made even)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.gguf = args.gguf or ensure_smollm2_gguf()
    args.concurrency = [int(part) for part in args.concurrency.split(",")]
    args.targets = [part for part in args.targets.split(",") if part]
    args.cases = [part for part in args.cases.split(",") if part]
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {sorted(TARGETS)}")
    if len(args.targets) > 1 and args.rounds % 2:
        # The order flips every round: with an odd count the first target would run
        # last more often, and a target that runs right after another's many-stream
        # case starts from an idle spell (docs/benchmarks.md, session 16).
        args.rounds += 1
        print(f"(rounds made even: {args.rounds}, so every target runs first as often as last)")
    native = any(target.startswith("llama-server") for target in args.targets)
    if native and not shutil.which(str(llama_server_binary())):
        parser.error("no llama-server binary: run scripts/build-llama-server")
    if not args.models:
        measurements = asyncio.run(main_async(args))
        if args.json:
            args.json.write_text(json.dumps(_records(measurements), indent=2))
        return
    by_model: dict[str, list[dict[str, Any]]] = {}
    for name, gguf in bench_models(args.models):
        print(f"\n## {name} ({gguf})\n", flush=True)
        args.gguf, args.model_name = gguf, f"ai/{name}"
        by_model[name] = _records(asyncio.run(main_async(args)))
    if args.json:
        args.json.write_text(json.dumps(by_model, indent=2))


def _records(measurements: list[Measurement]) -> list[dict[str, Any]]:
    return [
        {**asdict(m), "ttft_p50_ms": m.ttft_p50_ms, "ttft_p95_ms": m.ttft_p95_ms}
        for m in measurements
    ]


# A ~0.6B llama in Q8_0 (SmolLM2's vocabulary, random weights): the size at which
# issue 28 saw dmr fall behind at 8 streams.
RANDOM_06B = [
    "--embedding",
    "1024",
    "--layers",
    "32",
    "--heads",
    "16",
    "--kv-heads",
    "4",
    "--ffn",
    "4096",
    "--context",
    "8192",
    "--weights",
    "q8_0",
]


# Gemma 3 270M's shapes (640 wide, 18 layers, 4 heads of 256, one KV head, a 512-token
# window in five layers of six) with SmolLM2's vocabulary: a second architecture,
# since the package index has no small GGUF of one.
RANDOM_GEMMA3 = [
    "--arch",
    "gemma3",
    "--embedding",
    "640",
    "--layers",
    "18",
    "--heads",
    "4",
    "--kv-heads",
    "1",
    "--head-size",
    "256",
    "--ffn",
    "2048",
    "--sliding-window",
    "512",
    "--context",
    "32768",
    "--weights",
    "q8_0",
    "--name",
    "random-gemma3-270m",
]
RANDOM_MODELS = {
    "random-0.6b": ("random-0.6b-q8_0.gguf", RANDOM_06B),
    "random-gemma3": ("random-gemma3-270m-q8_0.gguf", RANDOM_GEMMA3),
}


def random_model(file_name: str, shape: list[str]) -> Path:
    """A random-weight GGUF under the sample cache, written once with SmolLM2's vocabulary."""
    from dmr.sample_model import cache_dir, ensure_smollm2_gguf

    target = cache_dir() / "samples" / file_name
    if target.exists():
        return target
    vocab = cache_dir() / "samples" / "smollm2.vocab.json"
    script = str(REPO / "bench" / "random_gguf.py")
    if not vocab.exists():
        subprocess.run(
            [sys.executable, script, "vocab", str(ensure_smollm2_gguf()), str(vocab)], check=True
        )
    partial = target.with_suffix(".partial")
    subprocess.run([sys.executable, script, "write", str(vocab), str(partial), *shape], check=True)
    partial.rename(target)
    return target


def bench_models(spec: str) -> list[tuple[str, Path]]:
    """(name, GGUF) for each entry of `--models`, writing the random ones once."""
    from dmr.sample_model import ensure_smollm2_gguf

    chosen: list[tuple[str, Path]] = []
    for entry in (part.strip() for part in spec.split(",") if part.strip()):
        if "=" in entry:
            name, path = entry.split("=", 1)
            chosen.append((name, Path(path)))
        elif entry == "smollm2":
            chosen.append(("smollm2", ensure_smollm2_gguf()))
        elif entry in RANDOM_MODELS:
            chosen.append((entry, random_model(*RANDOM_MODELS[entry])))
        else:
            known = ", ".join(["smollm2", *RANDOM_MODELS])
            raise SystemExit(f"unknown model {entry!r}: {known} or NAME=PATH")
    return chosen


if __name__ == "__main__":
    main()
