"""`LLAMA_ARGS` as Docker Model Runner users write it, through a real server and runner."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures.server import start_server
from tests.test_scheduler_smollm2 import put_smollm2

pytestmark = pytest.mark.llama

# The example of Docker Model Runner's own documentation.
DMR_EXAMPLE = "--verbose --jinja -ngl 999 --ctx-size 2048"


def test_the_documented_example_loads_and_answers(tmp_path: Path, smollm2_gguf: Path) -> None:
    put_smollm2_at(tmp_path, smollm2_gguf)
    server = start_server(tmp_path, {"LLAMA_ARGS": DMR_EXAMPLE})
    try:
        client = openai.OpenAI(base_url=f"{server.url}/engines/v1", api_key="unused")
        for _ in range(2):  # a second load of the runner warns no more
            answer = client.chat.completions.create(
                model="ai/smollm2",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=8,
                temperature=0,
            )
            assert answer.choices[0].message.content
            unloaded = httpx.post(f"{server.url}/engines/unload", json={"all": True}, timeout=60)
            assert unloaded.status_code == 200
        # --ctx-size reached the runner: a prompt longer than 2,048 tokens is refused.
        long_prompt = "word " * 2100
        refused = httpx.post(
            f"{server.url}/engines/v1/chat/completions",
            json={"model": "ai/smollm2", "messages": [{"role": "user", "content": long_prompt}]},
            timeout=120,
        )
        assert refused.status_code == 400 and "2048" in refused.text, refused.text
        warnings = [line for line in server.log().splitlines() if "--verbose has no effect" in line]
        assert len(warnings) == 1, warnings
    finally:
        server.stop()


def put_smollm2_at(tmp_path: Path, gguf: Path) -> None:
    class _Where:  # put_smollm2 needs only the store path of a server
        models_path = tmp_path / "models"

    put_smollm2(_Where(), gguf, "ai/smollm2", "2024-11-01T00:00:00Z")  # type: ignore[arg-type]


@pytest.mark.parametrize("flag", ["--log-file /tmp/x.log", "--lora /tmp/a.gguf", "--port 1"])
def test_flags_that_reach_outside_the_runner_are_refused(
    tmp_path: Path, smollm2_gguf: Path, flag: str
) -> None:
    put_smollm2_at(tmp_path, smollm2_gguf)
    server = start_server(tmp_path, {"LLAMA_ARGS": f"--verbose {flag}"})
    try:
        answer = httpx.post(
            f"{server.url}/engines/v1/chat/completions",
            json={"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}]},
            timeout=120,
        )
        assert answer.status_code == 400
        assert flag.split()[0] in answer.json()["error"]["message"]
    finally:
        server.stop()
