"""`LLAMA_SERVER_PATH`: the llama.cpp engine runs a native `llama-server` instead of
the llama-cpp-python runner, behind the same scheduler and proxy.

The binary is built from the llama.cpp sources in the installed llama-cpp-python
version's sdist by `scripts/build-llama-server` (run by `scripts/install-test-deps`)
and cached under ~/.cache/dmr.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures.llama_server import build_llama_server, running_llama_server
from tests.fixtures.server import DmrServer, free_port
from tests.fixtures.test_engine import ps
from tests.test_scheduler_smollm2 import put_smollm2

pytestmark = [pytest.mark.llama, pytest.mark.slow]


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """The cached native llama-server; built (once, minutes) if it is missing."""
    binary = build_llama_server()
    assert binary.name == "llama-server" and version("llama-cpp-python") in str(binary)
    return binary


def test_native_llama_server_serves_through_dmr(
    dmr_server_factory: Callable[..., DmrServer], smollm2_gguf: Path, llama_server_binary: Path
) -> None:
    server = dmr_server_factory(LLAMA_SERVER_PATH=str(llama_server_binary))
    put_smollm2(server, smollm2_gguf, "ai/smollm2", "2024-11-01T00:00:00Z")
    with server.client() as client:
        assert "llama-server at" in client.get("/engines/status").json()["llama.cpp"]
    api = openai.OpenAI(base_url=f"{server.url}/engines/v1", api_key="unused")

    reply = api.chat.completions.create(
        model="ai/smollm2",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
    stream = api.chat.completions.create(
        model="ai/smollm2",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text

    [runner] = ps(server)
    assert runner["backend_name"] == "llama.cpp"
    assert llama_server_binary.name in " ".join(_cmdline(runner["pid"]))
    with server.client() as client:
        metrics = client.get("/metrics").text
    # llama-server's own series, merged with dmr's labels.
    assert any(
        line.startswith("llamacpp:tokens_predicted_total{") and 'backend="llama.cpp"' in line
        for line in metrics.splitlines()
    ), metrics


def test_docker_model_runner_folder_layout(
    dmr_server_factory: Callable[..., DmrServer], smollm2_gguf: Path, llama_server_binary: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """`LLAMA_SERVER_PATH` as Docker Model Runner's builds lay it out: a folder holding
    `com.docker.llama-server.native.<os>.<accel>.<arch>/bin/com.docker.llama-server`."""
    native = tmp_path / "inference" / "com.docker.llama-server.native.linux.cpu.amd64" / "bin"
    native.mkdir(parents=True)
    (native / "com.docker.llama-server").symlink_to(llama_server_binary)
    server = dmr_server_factory(LLAMA_SERVER_PATH=str(tmp_path / "inference"))
    put_smollm2(server, smollm2_gguf, "ai/smollm2", "2024-11-01T00:00:00Z")
    with server.client() as client:
        assert "com.docker.llama-server" in client.get("/engines/status").json()["llama.cpp"]
    api = openai.OpenAI(base_url=f"{server.url}/engines/v1", api_key="unused")
    reply = api.chat.completions.create(
        model="ai/smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content
    [runner] = ps(server)
    assert str(native / "com.docker.llama-server") in _cmdline(runner["pid"])


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


@pytest.fixture
def native_llama_server(llama_server_binary: Path, smollm2_gguf: Path) -> Iterator[str]:
    """llama-server on 127.0.0.1 with dmr's default slots and context per slot."""
    slots = ["--parallel", "8", "--ctx-size", str(8 * 4096)]
    with running_llama_server(
        llama_server_binary, smollm2_gguf, free_port(), extra_args=slots
    ) as url:
        yield url


GREEDY_PROMPTS: list[Any] = [
    "Write a short story about a lighthouse keeper.",
    "Explain how bread is made, step by step.",
    "List three facts about the planet Mars.",
    # Content parts: llama-server puts each text part on a line of its own.
    [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": "Then a fruit."}],
]


def test_greedy_output_matches_native_llama_server(
    native_llama_server: str,
    dmr_server_factory: Callable[..., DmrServer],
    smollm2_gguf: Path,
) -> None:
    """dmr's Python runner and llama.cpp's own server, same GGUF, temperature 0: the
    same prompt tokens and the same answer, token for token.

    Both start with nothing cached and get the same requests in the same order, so
    both reuse the same cached prefixes: a prefix decoded in another batch shape can
    tip a near-tie in greedy decoding, in llama-server as in dmr.
    """
    server = dmr_server_factory()
    put_smollm2(server, smollm2_gguf, "ai/smollm2", "2024-11-01T00:00:00Z")
    native = openai.OpenAI(base_url=f"{native_llama_server}/v1", api_key="unused")
    ours = openai.OpenAI(base_url=f"{server.url}/engines/v1", api_key="unused")
    for prompt in GREEDY_PROMPTS:
        answers = [
            client.chat.completions.create(
                model="ai/smollm2",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=48,
                temperature=0,
            )
            for client in (native, ours)
        ]
        reference, mine = (answer.choices[0].message.content for answer in answers)
        assert reference and mine == reference, (prompt, reference, mine)
        assert answers[0].usage is not None and answers[1].usage is not None
        assert answers[1].usage.prompt_tokens == answers[0].usage.prompt_tokens
        assert answers[1].usage.completion_tokens == answers[0].usage.completion_tokens


def test_logit_bias_matches_native_llama_server(
    native_llama_server: str,
    dmr_server_factory: Callable[..., DmrServer],
    smollm2_gguf: Path,
) -> None:
    """`logit_bias` in OpenAI's form and in llama-server's (texts, pairs, false), at
    temperature 0: each changes the answer, and dmr's is llama-server's."""
    server = dmr_server_factory()
    put_smollm2(server, smollm2_gguf, "ai/smollm2", "2024-11-01T00:00:00Z")
    native = openai.OpenAI(base_url=f"{native_llama_server}/v1", api_key="unused")
    ours = openai.OpenAI(base_url=f"{server.url}/engines/v1", api_key="unused")
    messages: Any = [{"role": "user", "content": "Name a colour."}]
    plain = native.chat.completions.create(
        model="ai/smollm2", messages=messages, max_tokens=12, temperature=0, logprobs=True
    )
    assert plain.choices[0].logprobs is not None and plain.choices[0].logprobs.content
    first_text = plain.choices[0].logprobs.content[0].token
    tokenized = httpx.post(f"{native_llama_server}/tokenize", json={"content": first_text})
    (first,) = tokenized.json()["tokens"]
    biases: list[Any] = [
        {str(first): -100},  # OpenAI's form: the first token all but banned
        {" banana": 100},  # a text: its tokens pushed up
        [[first, False]],  # llama-server's pairs; false: never sampled
    ]
    for bias in biases:
        answers = [
            client.chat.completions.create(
                model="ai/smollm2",
                messages=messages,
                max_tokens=12,
                temperature=0,
                extra_body={"logit_bias": bias},
            )
            for client in (native, ours)
        ]
        reference, mine = (answer.choices[0].message.content for answer in answers)
        assert reference != plain.choices[0].message.content, bias
        assert mine == reference, (bias, reference, mine)
    with pytest.raises(openai.BadRequestError) as refused:
        ours.chat.completions.create(
            model="ai/smollm2", messages=messages, max_tokens=4, logit_bias={"99999999": -100}
        )
    assert "logit_bias" in str(refused.value)


SAMPLING_OPTIONS: list[dict[str, Any]] = [
    {"typical_p": 0.5},
    {"mirostat": 1, "mirostat_tau": 3.0},
    {"mirostat": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.2},
    {"repeat_penalty": 1.5},  # over the last 64 tokens, the prompt's among them
    {"repeat_penalty": 2.0, "repeat_last_n": 16},
    {"presence_penalty": 0.5},
    {"frequency_penalty": 1.0, "presence_penalty": 0.5},
]


def test_seeded_sampling_options_match_native_llama_server(
    native_llama_server: str,
    dmr_server_factory: Callable[..., DmrServer],
    smollm2_gguf: Path,
) -> None:
    """llama.cpp's sampling options, at temperature 1 with a seed: each changes the
    answer, and dmr's is llama-server's token for token (the same samplers in the
    same order, the penalties counting the prompt's tokens as llama-server's do)."""
    server = dmr_server_factory()
    put_smollm2(server, smollm2_gguf, "ai/smollm2", "2024-11-01T00:00:00Z")
    native = openai.OpenAI(base_url=f"{native_llama_server}/v1", api_key="unused")
    ours = openai.OpenAI(base_url=f"{server.url}/engines/v1", api_key="unused")
    messages: Any = [{"role": "user", "content": "Write a poem about the sea."}]

    def answers(options: dict[str, Any]) -> list[str | None]:
        return [
            client.chat.completions.create(
                model="ai/smollm2",
                messages=messages,
                max_tokens=32,
                temperature=1.0,
                seed=7,
                extra_body=options,
            )
            .choices[0]
            .message.content
            for client in (native, ours)
        ]

    plain, plain_ours = answers({})
    assert plain and plain_ours == plain
    for options in SAMPLING_OPTIONS:
        reference, mine = answers(options)
        assert reference != plain, options
        assert mine == reference, (options, reference, mine)
