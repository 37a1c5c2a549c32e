"""A runner yields the cores other processes keep busy (docs/scheduler.md, "Busy
neighbours"): next to processes that spin on as many cores as would leave it short,
SmolLM2's runner of a real `dmr serve` computes with fewer threads, and takes them
back once those processes stop. `DMR_FREE_CORES=0` keeps its threads. The busy
processes are real ones, started and stopped by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dmr_llamacpp.threads import default_threads
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import wait_for
from tests.test_scheduler_smollm2 import put_smollm2

pytestmark = [pytest.mark.llama, pytest.mark.slow]

ServerFactory = Callable[..., DmrServer]
MODEL = "ai/smollm2"
SPIN = "import time\nend = time.monotonic() + 300\nwhile time.monotonic() < end: pass\n"


def runner_value(server: DmrServer, name: str) -> int:
    """The loaded runner's `name` series on the server's /metrics."""
    with server.client() as client:
        text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return int(family.samples[0].value)
    raise AssertionError(f"no {name} in /metrics")


def threads(server: DmrServer) -> int:
    return runner_value(server, "llamacpp:threads")


def yielded(server: DmrServer) -> int:
    """Decode steps computed with fewer threads because of busy cores."""
    return runner_value(server, "llamacpp:steps_yielded")


def generate(server: DmrServer, tokens: int) -> int:
    """A streamed chat of `tokens` tokens, read to its end; the runner's threads then."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell a story about a lighthouse."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        server.client(timeout=300) as client,
        client.stream("POST", "/engines/v1/chat/completions", json=body) as answer,
    ):
        assert answer.status_code == 200
        events = [line for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= tokens
    return threads(server)


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def loaded(server: DmrServer, smollm2_gguf: Path) -> int:
    """The runner loaded, computing with all of its threads: llama.cpp's default of one
    per physical core (other work of this machine, if any, is waited out)."""
    put_smollm2(server, smollm2_gguf, MODEL, "2024-11-01T00:00:00Z")
    alone = default_threads()
    # Yielding needs two threads: this machine's cores, llama.cpp's default.
    assert alone >= 2, f"the runner loads with {alone} thread here"
    wait_for(
        lambda: generate(server, 2) == alone,
        timeout=120,
        message=f"the runner to compute with its {alone} threads",
    )
    return alone


def enough_to_leave_it_short(alone: int) -> int:
    """Busy processes that leave fewer free CPUs than the runner's threads."""
    return (os.cpu_count() or 1) - alone + 1


def test_a_runner_yields_busy_cores_and_takes_them_back(
    dmr_server_factory: ServerFactory, smollm2_gguf: Path
) -> None:
    server = dmr_server_factory(DMR_FREE_CORES="1")  # the suite turns it off elsewhere
    alone = loaded(server, smollm2_gguf)
    before = yielded(server)
    with busy_processes(enough_to_leave_it_short(alone)):
        assert generate(server, 24) < alone
    assert yielded(server) > before
    # Stopped, they leave the cores free: a step later every thread is back (other
    # work of this machine may come and go meanwhile: it is waited out).
    wait_for(
        lambda: generate(server, 4) == alone,
        timeout=120,
        message="the runner's threads to come back",
    )


def test_dmr_free_cores_0_keeps_the_threads(
    dmr_server_factory: ServerFactory, smollm2_gguf: Path
) -> None:
    server = dmr_server_factory(DMR_FREE_CORES="0")
    alone = loaded(server, smollm2_gguf)
    with busy_processes(enough_to_leave_it_short(alone)):
        # A few tokens only: next to a busy process each step of a runner that keeps
        # its threads takes a second or more (docs/benchmarks.md).
        assert generate(server, 3) == alone
    assert yielded(server) == 0
