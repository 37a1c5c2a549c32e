"""Where a lone stream's time goes: CPU per streamed token, by process and thread.

    python bench/cpu_per_token.py [--models smollm2,random-0.6b] [--tokens 600]
           [--rounds 3]

For each model, `dmr serve` (nothing configured but the bench's context per slot)
and llama.cpp's `llama-server` (`--parallel 8`, as `bench/llamacpp_concurrency.py`
starts it, on the copy of the GGUF in dmr's store) take turns: dmr, llama-server,
dmr. Each turn streams `--rounds` chat answers of `--tokens` tokens (temperature 0,
`ignore_eos`), one at a time, and reads every thread's CPU seconds from
`/proc/<pid>/task` before and after: `dmr serve`'s event loop, the runner's event
loop and its decode threads, llama-server's threads, and this client's own.

On two cores llama.cpp's two threads spin at every barrier, so any other thread's
CPU time in a step delays it by about as much (docs/benchmarks.md, session 17):
the figures say which process pays for each token beside llama.cpp. For dmr the
runner's step metrics add the Python around `llama_decode` in its decode thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from dmr.testing import free_port, stop_process

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_concurrency import (
    DMR_DEFAULT_CTX,
    DMR_DEFAULT_PARALLEL,
    _stored_gguf,
    bench_models,
    llama_server_binary,
    repack_flags,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# A connection per answer, for both servers: llama-server closes an idle one after
# 5 s, and a client that reuses it then gets "Server disconnected".
FRESH_CONNECTIONS = httpx.Limits(max_keepalive_connections=0)
MODEL = "bench"
PROMPT = "Tell me a long story about the sea."
STEP_SERIES = (
    "llamacpp:decode_steps_total",
    "llamacpp:step_seconds_total",
    "llamacpp:decode_seconds_total",
)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each of `pid`'s threads, by `name:tid`."""
    seconds: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        seconds[f"{name}:{tid}"] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


def stream(client: httpx.Client, tokens: int) -> tuple[int, float]:
    """(content chunks received, seconds) of one streamed answer."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    received = 0
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    received += 1
    return received, time.perf_counter() - started


def step_series(client: httpx.Client) -> dict[str, float]:
    """The runner's step counters, as `dmr serve`'s /metrics shows them."""
    values: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in STEP_SERIES:
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def measure(
    label: str, client: httpx.Client, pids: dict[str, int], args: argparse.Namespace
) -> tuple[float, list[str]]:
    """One turn: `--rounds` answers; its tokens/s, and a line per thread that used CPU."""
    stream(client, 20)  # warm: the prompt cached, the threads started
    metrics = httpx.Client(base_url=str(client.base_url).removesuffix("/engines/"))
    before_steps = step_series(metrics) if label == "dmr-server" else {}
    before = {name: thread_cpu(pid) for name, pid in pids.items()}
    mine = os.times()
    received, seconds = 0, 0.0
    for _ in range(args.rounds):
        count, took = stream(client, args.tokens)
        received, seconds = received + count, seconds + took
    after = {name: thread_cpu(pid) for name, pid in pids.items()}
    ours = os.times()
    lines = [
        f"{label}: {received / seconds:.1f} tokens/s, {seconds / received * 1e3:.2f} ms a token",
        f"  client (this process)            "
        f"{(ours.user + ours.system - mine.user - mine.system) / received * 1e3:6.3f} ms/token",
    ]
    for process, threads in after.items():
        for thread, used in sorted(threads.items()):
            spent = used - before[process].get(thread, 0.0)
            if spent >= 0.02:
                lines.append(f"  {process:10s} {thread:22s} {spent / received * 1e3:6.3f} ms/token")
    if before_steps:
        after_steps = step_series(metrics)
        steps = after_steps[STEP_SERIES[0]] - before_steps[STEP_SERIES[0]]
        step = (after_steps[STEP_SERIES[1]] - before_steps[STEP_SERIES[1]]) / steps
        decode = (after_steps[STEP_SERIES[2]] - before_steps[STEP_SERIES[2]]) / steps
        lines.append(
            f"  runner steps: {step * 1e3:.2f} ms each, {decode * 1e3:.2f} in llama_decode, "
            f"{(step - decode) * 1e3:.2f} Python around it"
        )
    metrics.close()
    return received / seconds, lines


def runner_pid(server_pid: int) -> int:
    found = subprocess.run(
        ["pgrep", "-P", str(server_pid), "-f", "dmr_llamacpp.runner"],
        capture_output=True,
        text=True,
    ).stdout.split()
    if len(found) != 1:
        raise RuntimeError(f"expected one runner under dmr serve, found {found}")
    return int(found[0])


def wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy")


@contextmanager
def dmr_server(gguf: Path, folder: Path) -> Iterator[tuple[httpx.Client, subprocess.Popen[bytes]]]:
    port = free_port()
    env = dict(
        os.environ,
        MODELS_PATH=str(folder / "models"),
        MODEL_RUNNER_PORT=str(port),
        MODEL_RUNNER_HOST=f"http://127.0.0.1:{port}",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "dmr", "serve"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}/", server)
        subprocess.run(
            [sys.executable, "-m", "dmr", "package", "--gguf", str(gguf), MODEL],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        httpx.post(
            f"{base}/engines/_configure", json={"model": MODEL, "context-size": DMR_DEFAULT_CTX}
        ).raise_for_status()
        with httpx.Client(
            base_url=f"{base}/engines/", timeout=600, limits=FRESH_CONNECTIONS
        ) as client:
            yield client, server
    finally:
        stop_process(server)


@contextmanager
def llama_server(gguf: Path) -> Iterator[tuple[httpx.Client, subprocess.Popen[bytes]]]:
    port = free_port()
    argv = [
        str(llama_server_binary()),
        *("--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)),
        *("--parallel", str(DMR_DEFAULT_PARALLEL)),
        *("--ctx-size", str(DMR_DEFAULT_CTX * DMR_DEFAULT_PARALLEL)),
        "--jinja",
        *repack_flags(gguf),  # the extra weight buffers exactly where dmr's runner uses them
    ]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", process)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}/", timeout=600, limits=FRESH_CONNECTIONS
        ) as client:
            yield client, process
    finally:
        stop_process(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2")
    parser.add_argument("--tokens", type=int, default=600, help="tokens per answer")
    parser.add_argument("--rounds", type=int, default=3, help="answers per turn")
    args = parser.parse_args()
    for name, gguf in bench_models(args.models):
        print(f"## {name}, 1 stream, {args.rounds} x {args.tokens} tokens", flush=True)
        rates: dict[str, list[float]] = {"dmr-server": [], "llama-server": []}
        with (
            tempfile.TemporaryDirectory(prefix="dmr-bench-cpu-") as folder,
            dmr_server(gguf, Path(folder)) as (client, server),
        ):
            stream(client, 5)  # loads the runner
            pids = {"dmr serve": server.pid, "runner": runner_pid(server.pid)}
            stored = _stored_gguf(Path(folder) / "models", MODEL)
            for turn in ("dmr-server", "llama-server", "dmr-server"):
                if turn == "dmr-server":
                    rate, lines = measure(turn, client, pids, args)
                else:
                    with llama_server(stored) as (native, process):
                        rate, lines = measure(turn, native, {"llama-srv": process.pid}, args)
                print("\n".join(lines), flush=True)
                rates[turn].append(rate)
        # dmr's two turns stand either side of llama-server's: their mean against it.
        dmr = statistics.mean(rates["dmr-server"])
        print(f"dmr-server / llama-server tokens/s: {dmr / rates['llama-server'][0]:.3f}\n")


if __name__ == "__main__":
    main()
