"""`dmr run` against the real SmolLM2 model on the llama.cpp engine."""

from __future__ import annotations

import sys

import pexpect
import pytest

from tests.fixtures.server import DmrServer

pytestmark = [pytest.mark.llama, pytest.mark.slow]

SMOLLM2 = "ai/smollm2"


def test_run_one_shot_answers(smollm2_server: DmrServer) -> None:
    result = smollm2_server.cli("run", SMOLLM2, "What is the capital of France?")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stdout.endswith("\n")


def test_run_interactive_chat_through_a_terminal(smollm2_server: DmrServer) -> None:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "dmr", "run", SMOLLM2],
        env=smollm2_server.env,
        encoding="utf-8",
        timeout=180,
        dimensions=(40, 200),
    )
    try:
        child.expect_exact("Interactive chat mode started")
        child.expect_exact("> ")
        child.sendline("Name one colour.")
        child.expect_exact("> ")  # the answer was printed and the next prompt came
        answer = child.before.replace("Name one colour.", "").strip()
        assert answer, "the model printed nothing"
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
