"""`POST /cpu-share`: the runner computes with its loaded threads divided by the
runners busy on the CPU, from its next decode on (docs/scheduler.md). Its runner keeps
its threads when other processes are busy (`DMR_FREE_CORES=0`): the counts asserted
here are the share's alone, whatever else this machine runs meanwhile."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from llamacpp_helpers import RunnerProcess, make_launch, short_socket

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def sharing_runner(llama_bundle: Path) -> Iterator[RunnerProcess]:
    runner = RunnerProcess(
        make_launch(llama_bundle, short_socket("share")), env={"DMR_FREE_CORES": "0"}
    )
    yield runner
    runner.stop()


def threads_now(client: httpx.Client) -> int:
    found = re.search(r"^llamacpp:threads (\S+)$", client.get("/metrics").text, re.MULTILINE)
    assert found
    return int(float(found.group(1)))


def complete(client: httpx.Client) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    assert client.post("/v1/completions", json=body).status_code == 200


def test_a_share_takes_effect_at_the_next_decode_and_is_given_back(
    sharing_runner: RunnerProcess,
) -> None:
    with sharing_runner.client() as client:
        complete(client)
        loaded = threads_now(client)
        try:
            answer = client.post("/cpu-share", json={"busy_runners": 2})
            assert answer.status_code == 200
            assert answer.json()["threads"] == max(1, loaded // 2)
            assert threads_now(client) == loaded  # not under way: no decode since
            complete(client)
            assert threads_now(client) == max(1, loaded // 2)
            # More runners than threads: still one thread, never none.
            assert client.post("/cpu-share", json={"busy_runners": 64}).json()["threads"] == 1
        finally:
            assert client.post("/cpu-share", json={"busy_runners": 1}).status_code == 200
        complete(client)
        assert threads_now(client) == loaded


@pytest.mark.parametrize("busy", [0, -1, 1.5, "2", True, None])
def test_a_share_must_be_a_count_of_runners(sharing_runner: RunnerProcess, busy: object) -> None:
    with sharing_runner.client() as client:
        answer = client.post("/cpu-share", json={"busy_runners": busy})
    assert answer.status_code == 400
    assert "busy_runners" in answer.text
