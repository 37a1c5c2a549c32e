"""Prompt caches that outlive their runner (docs/scheduler.md, "Prompt caches across
reloads"), through a real `dmr serve` and the real SmolLM2 runner: saved under the
store when the runner stops (unload, idle timeout, eviction, server restart), read
back by the next runner of the model, shown by `dmr df`, removed by `dmr rm` and
`dmr purge`, and a damaged file ignored."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dmr.distribution.packaging import PackageOptions, package_gguf, write_to_store
from dmr.store import Store
from dmr_llamacpp.runner.row_kinds import repeat_tail

from tests.fixtures.server import DmrServer, start_server
from tests.fixtures.store import package_smollm2
from tests.fixtures.test_engine import ps, wait_for

pytestmark = [pytest.mark.llama, pytest.mark.slow]

ServerFactory = Callable[..., DmrServer]
MODEL = "ai/smollm2"
N_UBATCH = 512  # the runner's default micro-batch


def reused(prompt_tokens: int) -> int:
    """The cached tokens of a greedy request repeating a prompt (runner/row_kinds.py)."""
    return prompt_tokens - repeat_tail(prompt_tokens, N_UBATCH)


CHAT = "/engines/v1/chat/completions"


def long_document(sentences: int) -> str:
    """About 14 tokens per sentence, the same text every time."""
    return " ".join(
        f"Entry {index}: the harbour log records ship {index * 7 % 101} at berth {index % 13}."
        for index in range(sentences)
    )


# About 1,800 tokens of SmolLM2 with the chat template.
LONG_PROMPT = long_document(92) + "\n\nWhich berth appears most often? Answer briefly."


def chat(server: DmrServer, prompt: str, max_tokens: int = 24) -> dict[str, Any]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    with server.client(timeout=300) as client:
        answer = client.post(CHAT, json=body)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def cached(answer: dict[str, Any]) -> int:
    return int((answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def unload(server: DmrServer) -> None:
    with server.client() as client:
        assert client.post("/engines/unload", json={"models": [MODEL]}).status_code == 200
    assert ps(server) == []


def cache_files(server: DmrServer) -> list[Path]:
    return sorted((server.models_path / "prompt-cache").glob("*/*/*.kv"))


def runner_log(server: DmrServer) -> str:
    return "".join(path.read_text(errors="replace") for path in server_logs(server))


def server_logs(server: DmrServer) -> list[Path]:
    return sorted((server.models_path.parent / "logs").glob("runner-*.log"))


@pytest.fixture
def server(dmr_server_factory: ServerFactory, smollm2_gguf: Path) -> DmrServer:
    started = dmr_server_factory()
    package_smollm2(started.models_path, smollm2_gguf, MODEL)
    return started


def test_a_prompt_seen_before_an_unload_skips_its_prefill_after_it(server: DmrServer) -> None:
    cold = chat(server, LONG_PROMPT)
    prompt_tokens = cold["usage"]["prompt_tokens"]
    assert 1700 < prompt_tokens < 1900
    assert cached(cold) < prompt_tokens // 2
    warm = chat(server, LONG_PROMPT)
    assert cached(warm) == reused(prompt_tokens)
    unload(server)
    assert cache_files(server), "unloading saved no prompt cache"

    reloaded = chat(server, LONG_PROMPT)
    assert cached(reloaded) == reused(prompt_tokens)
    # Greedy: the cached cells and the last rows decoded again give the cold prefill's
    # logits, so its answer (docs/scheduler.md, "Prompt caches across reloads").
    answers = [body["choices"][0]["message"]["content"] for body in (cold, warm, reloaded)]
    assert answers[0] == answers[1] == answers[2]
    assert re.search(r"restored [1-9]\d* saved prompt caches", runner_log(server))


def test_a_prompt_seen_before_a_server_restart_skips_its_prefill_after_it(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> None:
    """Stopping the server stops its runners with SIGTERM: they save on the way out."""
    folder = tmp_path_factory.mktemp("dmr-restart")
    package_smollm2(folder / "models", smollm2_gguf, MODEL)
    # One budget for both starts: the context and slots the engine sizes by it are
    # part of the caches' key, and the free memory another test leaves may differ.
    budget = {"DMR_MEMORY_BUDGET": str(16 * 1024**3)}
    first = start_server(folder, budget)
    try:
        chat(first, long_document(40), max_tokens=8)
        warm = chat(first, long_document(40), max_tokens=8)
    finally:
        first.stop()
    assert cache_files(first)
    second = start_server(folder, budget)
    try:
        again = chat(second, long_document(40), max_tokens=8)
    finally:
        second.stop()
    assert cached(again) == reused(again["usage"]["prompt_tokens"])
    assert again["choices"][0]["message"]["content"] == warm["choices"][0]["message"]["content"]


def test_an_idle_timeout_saves_the_prompts_too(
    dmr_server_factory: ServerFactory, smollm2_gguf: Path
) -> None:
    server = dmr_server_factory(DMR_IDLE_TIMEOUT_SECONDS="1")
    package_smollm2(server.models_path, smollm2_gguf, MODEL)
    chat(server, long_document(12), max_tokens=4)
    wait_for(lambda: ps(server) == [] and bool(cache_files(server)), 30, "the idle unload")
    again = chat(server, long_document(12), max_tokens=4)
    assert cached(again) == reused(again["usage"]["prompt_tokens"])


def test_an_eviction_for_another_model_saves_the_prompts_too(
    dmr_server_factory: ServerFactory, smollm2_gguf: Path
) -> None:
    # A budget for one SmolLM2 runner (about 1.9 GiB): the second model evicts the first.
    server = dmr_server_factory(DMR_MEMORY_BUDGET=str(2 * 1024**3))
    package_smollm2(server.models_path, smollm2_gguf, MODEL)
    other = "ai/smollm2-other"
    artifact = package_gguf([smollm2_gguf], PackageOptions(created="2024-11-02T00:00:00Z"))
    write_to_store(Store.open(server.models_path), artifact, [other])
    chat(server, long_document(12), max_tokens=4)
    body = {"model": other, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with server.client(timeout=300) as client:
        assert client.post(CHAT, json=body).status_code == 200
    assert [runner["model_name"] for runner in ps(server)] == [other]
    assert cache_files(server)
    again = chat(server, long_document(12), max_tokens=4)
    assert cached(again) == reused(again["usage"]["prompt_tokens"])


def test_a_damaged_cache_file_is_logged_and_ignored(server: DmrServer) -> None:
    cold = chat(server, LONG_PROMPT)
    unload(server)
    [saved] = cache_files(server)
    data = bytearray(saved.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(byte ^ 0xFF for byte in data[middle : middle + 64])
    saved.write_bytes(bytes(data))

    again = chat(server, LONG_PROMPT)
    assert cached(again) < again["usage"]["prompt_tokens"] // 2  # decoded anew
    assert again["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
    log = runner_log(server)
    assert f"ignoring the saved prompt cache {saved}: checksum mismatch" in log
    # The damaged file was removed; the runner still saves the prompt when it stops.
    unload(server)
    [resaved] = cache_files(server)
    assert resaved.read_bytes() != bytes(data)


def test_a_truncated_cache_file_is_logged_and_ignored(server: DmrServer) -> None:
    chat(server, long_document(12), max_tokens=4)
    unload(server)
    [saved] = cache_files(server)
    saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 3])

    again = chat(server, long_document(12), max_tokens=4)
    assert cached(again) == 0
    assert f"ignoring the saved prompt cache {saved}: truncated state" in runner_log(server)


def test_df_counts_the_caches_rm_and_purge_remove_them(
    server: DmrServer, smollm2_gguf: Path
) -> None:
    chat(server, long_document(12), max_tokens=4)
    unload(server)
    [saved] = cache_files(server)
    with server.client() as client:
        usage = client.get("/engines/df").json()
    assert usage["prompt_cache_disk_usage"] == saved.stat().st_size
    listed = server.cli("df")
    assert listed.returncode == 0, listed.stderr
    assert "Prompt caches" in listed.stdout

    removed = server.cli("rm", MODEL)
    assert removed.returncode == 0, removed.stderr
    assert not saved.parent.parent.exists()  # <store>/prompt-cache/<model digest>
    with server.client() as client:
        assert client.get("/engines/df").json()["prompt_cache_disk_usage"] == 0

    package_smollm2(server.models_path, smollm2_gguf, MODEL)
    chat(server, long_document(12), max_tokens=4)
    unload(server)
    assert cache_files(server)
    purged = server.cli("purge", "--force")
    assert purged.returncode == 0, purged.stderr
    assert cache_files(server) == []
