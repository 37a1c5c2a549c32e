"""A reasoning model's thinking through `dmr serve` with the official Ollama and
Anthropic clients, on the real SmolLM2 runner.

SmolLM2 never thinks on its own. Packaged with a chat template that opens the
thinking at the start of the answer, as Qwen3's and DeepSeek-R1's do (`<think>`
unless `enable_thinking` is false), it writes its answer as thinking until the
runner's `--reasoning-budget` (6 tokens here) forces `</think>`; what follows is the
answer. So each answer has both parts, and turning thinking off leaves none.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import ollama
import pytest

from tests.fixtures.server import DmrServer, start_server
from tests.fixtures.store import package_smollm2

pytestmark = [pytest.mark.llama, pytest.mark.slow]

MODEL = "ai/thinker"
THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is not defined or enable_thinking %}<think>\n{% endif %}"
    "{% endif %}"
)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def thinking_server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> Iterator[DmrServer]:
    tmp = tmp_path_factory.mktemp("dmr-thinking")
    template = tmp / "template.jinja"
    template.write_text(THINKING_TEMPLATE)
    package_smollm2(tmp / "models", smollm2_gguf, f"{MODEL}:latest", chat_template=template)
    server = start_server(tmp, {"LLAMA_ARGS": "--reasoning-budget 6"})
    yield server
    server.stop()


def test_ollama_thinking(thinking_server: DmrServer) -> None:
    client = ollama.Client(host=thinking_server.url)
    options = {"num_predict": 24, "temperature": 0}
    answer = client.chat(model=MODEL, messages=QUESTION, think=True, options=options)
    assert answer.message.thinking and answer.message.content
    assert "<think>" not in answer.message.content and "</think>" not in answer.message.content
    streamed = client.chat(model=MODEL, messages=QUESTION, think=True, options=options, stream=True)
    parts = list(streamed)
    assert "".join(part.message.thinking or "" for part in parts) == answer.message.thinking
    assert "".join(part.message.content for part in parts) == answer.message.content
    # think=False renders the template without `<think>`: no thinking at all.
    plain = client.chat(model=MODEL, messages=QUESTION, think=False, options=options)
    assert not plain.message.thinking and plain.message.content


def test_anthropic_thinking_blocks(thinking_server: DmrServer) -> None:
    client = anthropic.Anthropic(
        base_url=f"{thinking_server.url}/anthropic", api_key="unused", max_retries=0
    )
    message = client.messages.create(
        model=MODEL,
        max_tokens=24,
        messages=QUESTION,  # type: ignore[arg-type]
        thinking={"type": "enabled", "budget_tokens": 4},
    )
    assert [block.type for block in message.content] == ["thinking", "text"]
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking.strip()
    assert text.type == "text" and text.text.strip()
    with client.messages.stream(
        model=MODEL,
        max_tokens=24,
        messages=QUESTION,  # type: ignore[arg-type]
        thinking={"type": "enabled", "budget_tokens": 4},
    ) as stream:
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text"]
    disabled = client.messages.create(
        model=MODEL,
        max_tokens=24,
        messages=QUESTION,  # type: ignore[arg-type]
        thinking={"type": "disabled"},
    )
    assert [block.type for block in disabled.content] == ["text"]
