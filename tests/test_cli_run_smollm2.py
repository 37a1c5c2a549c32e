"""`dmr run` against the real SmolLM2 model on the llama.cpp engine."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from dmr.distribution.packaging import package_gguf, write_to_store
from dmr.store import Store

from tests.fixtures.server import DmrServer, start_server

pytestmark = [pytest.mark.llama, pytest.mark.slow]

SMOLLM2 = "ai/smollm2"


@pytest.fixture(scope="session")
def smollm2_run_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    smollm2_gguf: Path,
) -> Iterator[DmrServer]:
    """The store engineer's `smollm2_server` when it exists, else one built here."""
    try:
        shared: DmrServer = request.getfixturevalue("smollm2_server")
    except pytest.FixtureLookupError:
        pass
    else:
        yield shared
        return
    tmp = tmp_path_factory.mktemp("smollm2-run")
    write_to_store(Store.open(tmp / "models"), package_gguf([smollm2_gguf]), [SMOLLM2])
    server = start_server(tmp)
    yield server
    server.stop()


def test_run_one_shot_answers(smollm2_run_server: DmrServer) -> None:
    result = smollm2_run_server.cli("run", SMOLLM2, "What is the capital of France?")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stdout.endswith("\n")


def test_run_interactive_chat_through_a_terminal(smollm2_run_server: DmrServer) -> None:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "dmr", "run", SMOLLM2],
        env=smollm2_run_server.env,
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
