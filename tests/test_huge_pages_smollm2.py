"""A CPU runner of a real `dmr serve`, with nothing configured, holds SmolLM2's weights
in transparent huge pages where the host gives them (plugins/llamacpp's huge_pages.py,
docs/scheduler.md "Weights in huge pages"), and maps the file when asked to (`--mmap`).
The pages are read from the runner process's own /proc entry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from dmr_llamacpp.huge_pages import anon_huge_page_bytes, huge_pages_available

from tests.fixtures.server import DmrServer
from tests.test_free_cores_smollm2 import runner_value
from tests.test_scheduler_smollm2 import put_smollm2

pytestmark = [pytest.mark.llama]

MODEL = "ai/smollm2"


def _answer_and_runner_pid(server: DmrServer) -> int:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 8,
        "temperature": 0,
    }
    with server.client(timeout=300) as client:
        answer = client.post("/engines/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        [runner] = client.get("/engines/ps").json()
    return int(runner["pid"])


def _anon_huge_bytes(pid: int) -> int:
    return anon_huge_page_bytes(Path(f"/proc/{pid}/smaps_rollup"))


def _maps_a_gguf(pid: int) -> bool:
    """Whether the runner has a GGUF file mapped (its weights read from the page cache)."""
    return any(
        line.rstrip().endswith(".gguf")
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
    )


def _argv_and_tunables(pid: int) -> tuple[list[str], str | None]:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    for entry in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0"):
        if entry.startswith("GLIBC_TUNABLES="):
            return argv, entry.partition("=")[2]
    return argv, None


def test_a_default_cpu_runner_holds_its_weights_in_huge_pages(
    dmr_server_factory: Callable[..., DmrServer], smollm2_gguf: Path
) -> None:
    server = dmr_server_factory()
    put_smollm2(server, smollm2_gguf, MODEL, "2024-11-01T00:00:00Z")
    pid = _answer_and_runner_pid(server)
    argv, tunables = _argv_and_tunables(pid)
    if huge_pages_available():
        assert "--no-mmap" in argv
        assert tunables is not None and "glibc.malloc.hugetlb=1" in tunables.split(":")
        # The weights (the whole file but its header) in huge pages; the kernel may
        # give a few 4 KiB pages where a 2 MiB one would cross the buffer's ends.
        assert _anon_huge_bytes(pid) >= 0.9 * smollm2_gguf.stat().st_size
        assert not _maps_a_gguf(pid)
        # /metrics says so too.
        assert runner_value(server, "llamacpp:huge_page_bytes") >= _anon_huge_bytes(pid) * 0.9
    else:  # a host without them: llama.cpp's default, the file mapped
        assert "--mmap" in argv and tunables is None and _maps_a_gguf(pid)


def test_a_runner_asked_to_map_the_file_does(
    dmr_server_factory: Callable[..., DmrServer], smollm2_gguf: Path
) -> None:
    server = dmr_server_factory()
    put_smollm2(server, smollm2_gguf, MODEL, "2024-11-01T00:00:00Z")
    with server.client() as client:
        configured = client.post(
            "/engines/_configure", json={"model": MODEL, "runtime-flags": ["--mmap"]}
        )
        assert configured.status_code in (200, 202), configured.text
    pid = _answer_and_runner_pid(server)
    argv, tunables = _argv_and_tunables(pid)
    assert "--mmap" in argv and "--no-mmap" not in argv
    assert tunables is None and _maps_a_gguf(pid)
