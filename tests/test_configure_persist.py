"""`configure` settings survive a restart of `dmr serve`; `configure show`'s sources;
`docker model configure`'s flags reaching the `_configure` body, or refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ollama
import psutil
import pytest
from dmr.distribution.packaging import PackageOptions, package_gguf, write_to_store
from dmr.scheduler.model_configs import CONFIGS_FILE
from dmr.store import Store

from tests.fixtures.server import DmrServer, start_server
from tests.fixtures.test_engine import MiB, add_test_model, ps, wait_for

ServerFactory = Callable[..., DmrServer]
CHAT = "/engines/v1/chat/completions"
TEST_ENGINE_ENV = {"DMR_IDLE_TIMEOUT_SECONDS": "60", "DMR_MEMORY_BUDGET": str(20 * MiB)}


def show(server: DmrServer, model: str | None = None) -> list[dict[str, Any]]:
    shown = server.cli("configure", "show", *([model] if model else []))
    assert shown.returncode == 0, shown.stderr
    items: list[dict[str, Any]] = json.loads(shown.stdout)
    return items


def chat(server: DmrServer, model: str, content: str) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    with server.client() as client:
        answer = client.post(CHAT, json=body)
    return answer.status_code, answer.json()


def idle(server: DmrServer) -> bool:
    return any(not r["loading"] and not r["in_use"] for r in ps(server))


@pytest.mark.llama
@pytest.mark.slow
def test_configured_context_is_the_runners_after_a_restart(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    store = Store.open(tmp_path / "models")
    write_to_store(store, package_gguf([smollm2_gguf], PackageOptions()), ["ai/smollm2"])
    packaged = package_gguf(
        [smollm2_gguf], PackageOptions(context_size=2048, created="2024-01-01T00:00:00Z")
    )
    write_to_store(store, packaged, ["ai/smollm2-packaged"])
    # About 900 tokens: within the default context, beyond the configured 512.
    long_prompt = "The lighthouse keeper counted the ships. " * 110

    first = start_server(tmp_path)
    try:
        done = first.cli("configure", "--context-size", "512", "--keep-alive", "-1", "ai/smollm2")
        assert done.returncode == 0, done.stderr
        kept = first.cli("configure", "--keep-alive", "10m", "ai/smollm2-packaged")
        assert kept.returncode == 0, kept.stderr
        wait_for(lambda: len([r for r in ps(first) if not r["loading"]]) == 2, 120, "preloads")
    finally:
        first.stop()
    assert (tmp_path / "models" / CONFIGS_FILE).is_file()

    second = start_server(tmp_path)
    try:
        assert ps(second) == []  # nothing loaded: the next load reads the stored configuration
        status, answer = chat(second, "ai/smollm2", long_prompt)
        assert status == 400, answer
        assert "context size of 512 tokens" in answer["error"]["message"]
        status, answer = chat(second, "ai/smollm2", "Hi")
        assert status == 200, answer
        [runner] = ps(second)
        argv = psutil.Process(runner["pid"]).cmdline()
        assert argv[argv.index("--ctx-size") + 1] == "512"
        assert runner["keep_alive"] == "-1"

        [configured] = show(second, "ai/smollm2")
        assert configured["context-size"] == 512
        assert configured["keep_alive"] == "-1"
        assert configured["sources"]["context-size"] == "configure"
        assert configured["sources"]["keep_alive"] == "configure"
        assert configured["sources"]["runtime-flags"] == "default"
        [from_model] = show(second, "ai/smollm2-packaged")
        assert from_model["context-size"] == 2048
        assert from_model["keep_alive"] == "10m"
        assert from_model["sources"]["context-size"] == "model"
        assert from_model["sources"]["keep_alive"] == "configure"
    finally:
        second.stop()


def test_configure_show_sources_and_the_new_flags(test_engine_server: DmrServer) -> None:
    server = test_engine_server
    add_test_model(server.models_path, "test/a")
    done = server.cli(
        "configure",
        "--speculative-num-tokens", "4",
        "--speculative-min-acceptance-rate", "0.5",
        "--hf_overrides", '{"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}',
        "--gpu-memory-utilization", "0.8",
        "--think=false",
        "--replicas", "2",
        "test/a",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    [item] = show(server, "test/a")
    assert item["speculative"] == {"draft_model": None, "num_tokens": 4, "min_acceptance_rate": 0.5}
    assert item["vllm"] == {
        "hf-overrides": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
        "gpu-memory-utilization": 0.8,
    }
    assert item["llamacpp"] == {"reasoning-budget": 0}
    # Nothing packaged or configured: the engine picks the context when it loads.
    assert item["context-size"] is None
    assert item["keep_alive"] == "1m"  # the server's DMR_IDLE_TIMEOUT_SECONDS
    assert item["replicas"] == 2
    assert item["sources"] == {
        "context-size": "default",
        "runtime-flags": "default",
        "keep_alive": "default",
        "replicas": "configure",
        "speculative": "configure",
        "vllm": "configure",
        "llamacpp": "configure",
    }

    as_text = server.cli("configure", "show", "--format", "text", "test/a")
    assert as_text.returncode == 0, as_text.stderr
    header, *rows = as_text.stdout.splitlines()
    assert header.split() == ["MODEL", "BACKEND", "MODE", "SETTING", "VALUE", "SOURCE"]
    assert rows[0].split() == ["test/a", "test-engine", "completion", "context-size",
                               "(engine", "default)", "default"]  # fmt: skip
    assert rows[2].split() == ["keep_alive", "1m", "default"]
    assert rows[3].split() == ["replicas", "2", "configure"]
    assert rows[4].split() == ["speculative", '{"min_acceptance_rate":', "0.5,",
                               '"num_tokens":', "4}", "configure"]  # fmt: skip
    wrong = server.cli("configure", "show", "--format", "yaml")
    assert wrong.returncode == 2 and "'yaml' is not one of 'json', 'text'" in wrong.stderr

    wait_for(lambda: idle(server), message="preload")
    # A bare --think is DMR's "true": reasoning on, unlimited; the model is not its value.
    thinking = server.cli("configure", "--think", "test/a")
    assert thinking.returncode == 0, thinking.stderr
    [item] = show(server, "test/a")
    assert item["llamacpp"] == {"reasoning-budget": -1}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--speculative-num-tokens", "0"], "--speculative-num-tokens"),
        (["--speculative-num-tokens", "many"], "--speculative-num-tokens"),
        (["--speculative-min-acceptance-rate", "1.5"], "--speculative-min-acceptance-rate"),
        (["--hf_overrides", "{not json"], "invalid JSON"),
        (["--hf_overrides", "[1, 2]"], "expects a JSON object"),
        (["--hf_overrides", '{"--max-model-len": 1}'], "invalid key '--max-model-len'"),
        (["--hf_overrides", '{"a": {"b;rm": 1}}'], "invalid key 'a.b;rm'"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1]"),
        (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization must be in (0, 1]"),
        (["--think=maybe"], "expects true or false, got 'maybe'"),
        (["--think", "--reasoning-budget", "64"], "--think or --reasoning-budget, not both"),
    ],
)
def test_bad_configure_flags_are_refused(
    test_engine_server: DmrServer, flags: list[str], message: str
) -> None:
    add_test_model(test_engine_server.models_path, "test/a")

    refused = test_engine_server.cli("configure", *flags, "test/a")

    assert refused.returncode != 0
    assert message in refused.stderr
    assert show(test_engine_server) == []  # nothing reached the server


def test_configuration_of_a_removed_model_does_not_break_start_up(tmp_path: Path) -> None:
    add_test_model(tmp_path / "models", "test/a")
    kept = add_test_model(tmp_path / "models", "test/b")
    first = start_server(tmp_path, TEST_ENGINE_ENV)
    try:
        for model in ("test/a", "test/b"):
            done = first.cli("configure", "--context-size", "1024", model)
            assert done.returncode == 0, done.stderr
    finally:
        first.stop()
    Store.open(tmp_path / "models").delete("test/a")

    second = start_server(tmp_path, TEST_ENGINE_ENV)
    try:
        assert "dropped the configuration of test/a" in second.log()
        [item] = show(second)
        assert (item["model"], item["context-size"]) == ("test/b", 1024)
        stored = json.loads((tmp_path / "models" / CONFIGS_FILE).read_text())
        assert list(stored["models"]) == [kept.id]
        # The dropped model, pulled again, loads with nothing configured.
        add_test_model(tmp_path / "models", "test/a")
        assert [i["model"] for i in show(second)] == ["test/b"]
    finally:
        second.stop()


def test_an_unreadable_configuration_file_does_not_break_start_up(tmp_path: Path) -> None:
    add_test_model(tmp_path / "models", "test/a")
    (tmp_path / "models" / CONFIGS_FILE).write_text("{not json")

    server = start_server(tmp_path, TEST_ENGINE_ENV)
    try:
        assert "cannot be read" in server.log()
        assert show(server) == []
        done = server.cli("configure", "--context-size", "1024", "test/a")
        assert done.returncode == 0, done.stderr
        stored = json.loads((tmp_path / "models" / CONFIGS_FILE).read_text())
        [entry] = stored["models"].values()
        assert entry["context-size"] == 1024
    finally:
        server.stop()


def test_ollama_num_ctx_is_not_kept_across_a_restart(tmp_path: Path) -> None:
    """Ollama's `num_ctx` is a request's option: it reconfigures the runner, in memory
    only, and the configure setting stored before it is the one a restart brings back."""
    add_test_model(tmp_path / "models", "ai/echo:latest")
    first = start_server(tmp_path, TEST_ENGINE_ENV)
    try:
        done = first.cli("configure", "--context-size", "2048", "ai/echo")
        assert done.returncode == 0, done.stderr
        wait_for(lambda: idle(first), message="preload")
        client = ollama.Client(host=first.url)
        client.chat(model="echo", messages=[{"role": "user", "content": "hi"}],
                    options={"num_ctx": 1024})  # fmt: skip
        [item] = show(first)
        assert item["context-size"] == 1024
    finally:
        first.stop()
    stored = json.loads((tmp_path / "models" / CONFIGS_FILE).read_text())
    [entry] = stored["models"].values()
    assert entry["context-size"] == 2048

    second = start_server(tmp_path, TEST_ENGINE_ENV)
    try:
        [item] = show(second)
        assert (item["context-size"], item["sources"]["context-size"]) == (2048, "configure")
    finally:
        second.stop()
