"""OpenAI's Files and Batch APIs through a real `dmr serve`, with the official `openai`
client and the test engine's runners: bad lines, endings (completed, failed,
expired, cancelled), a server killed mid-batch, a disk that fills, and batch lines
standing aside for interactive requests."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures.server import DmrServer, start_server
from tests.fixtures.test_engine import MiB, add_test_model, chat_body, wait_for

ServerFactory = Callable[..., DmrServer]
CHAT = "/v1/chat/completions"
ENDED = {"completed", "failed", "expired", "cancelled"}


def client_of(server: DmrServer, prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + prefix, api_key="unused", max_retries=0)


def chat_line(custom_id: str, model: str = "test/a", **test: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": f"hello {custom_id}"}],
    }
    if test:
        body["test"] = test
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def jsonl(lines: list[Any]) -> bytes:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode()


def upload(client: openai.OpenAI, data: bytes) -> str:
    return client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch").id


def wait_ended(client: openai.OpenAI, batch_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ENDED:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not end: {batch}")


def results(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


@pytest.fixture
def server(dmr_server_factory: ServerFactory) -> DmrServer:
    served = dmr_server_factory()
    add_test_model(served.models_path, "test/a")
    return served


def test_a_batch_with_bad_lines_completes_and_each_line_is_answered_once(
    server: DmrServer,
) -> None:
    client = client_of(server)
    good = [chat_line(f"good-{i}") for i in range(12)]
    bad: list[Any] = [
        "this is not json",
        {"method": "POST", "url": CHAT, "body": {"model": "test/a"}},  # no custom_id
        chat_line("good-3"),  # a duplicate custom_id
        {**chat_line("wrong-url"), "url": "/v1/embeddings"},
        chat_line("no-such-model", model="nobody/nothing"),
        chat_line("refused", model="Bad Name!"),  # the endpoint's 400: not a model name
    ]
    file_id = upload(client, jsonl(good[:6] + bad + good[6:]))

    batch = client.batches.create(
        input_file_id=file_id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    batch = wait_ended(client, batch.id)

    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (18, 12)
    assert batch.request_counts.failed == 6
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    outputs = results(client, batch.output_file_id)
    errors = results(client, batch.error_file_id)
    assert sorted(line["custom_id"] for line in outputs) == sorted(f"good-{i}" for i in range(12))
    assert all(line["response"]["status_code"] == 200 for line in outputs)
    assert "hello good-0" in json.dumps(outputs)
    by_code = {(line["error"] or {}).get("code") or line["response"]["status_code"]: line
               for line in errors}  # fmt: skip
    assert set(by_code) == {
        "invalid_json", "missing_custom_id", "duplicate_custom_id", "mismatched_url", 404, 400
    }  # fmt: skip
    assert "line 7" in by_code["invalid_json"]["error"]["message"]
    assert "line 4" in by_code["duplicate_custom_id"]["error"]["message"]  # the first use
    assert by_code[400]["custom_id"] == "refused"
    assert by_code[404]["custom_id"] == "no-such-model"
    ids = [line["id"] for line in outputs + errors]
    assert len(ids) == len(set(ids)) == 18


def test_files_api_lists_reads_and_deletes_and_unknown_ids_are_404(server: DmrServer) -> None:
    client = client_of(server, "/engines/v1")  # Docker Model Runner's prefix too
    first = client.files.create(file=("a.jsonl", io.BytesIO(b'{"x": 1}\n')), purpose="batch")
    second = client.files.create(file=("b.txt", io.BytesIO(b"hello")), purpose="user_data")

    assert (first.filename, first.bytes, first.purpose) == ("a.jsonl", 9, "batch")
    assert client.files.retrieve(first.id).id == first.id
    assert client.files.content(second.id).content == b"hello"
    assert [f.id for f in client.files.list(purpose="batch")] == [first.id]
    assert {f.id for f in client.files.list()} == {first.id, second.id}
    assert client.files.delete(first.id).deleted
    with pytest.raises(openai.NotFoundError) as missing:
        client.files.retrieve(first.id)
    assert missing.value.body["message"] == f"No such File object: {first.id}"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nothing")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("c", io.BytesIO(b"x")), purpose="nonsense")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.batches.create(input_file_id="file_x", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="'batch'"):
        client.batches.create(input_file_id=second.id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=second.id, endpoint="/v1/moderations",  # type: ignore[arg-type]
                              completion_window="24h")  # fmt: skip


def test_an_empty_file_fails_the_batch_and_a_finished_batch_cannot_be_cancelled(
    server: DmrServer,
) -> None:
    client = client_of(server)
    batch = client.batches.create(
        input_file_id=upload(client, b"\n\n"), endpoint=CHAT, completion_window="24h"
    )
    batch = wait_ended(client, batch.id)

    assert batch.status == "failed" and batch.failed_at
    assert batch.errors is not None and batch.errors.data is not None
    assert [error.code for error in batch.errors.data] == ["empty_file"]
    with pytest.raises(openai.ConflictError, match="Cannot cancel a batch with status 'failed'"):
        client.batches.cancel(batch.id)


def test_batches_list_newest_first_with_after_and_limit(server: DmrServer) -> None:
    client = client_of(server)
    file_id = upload(client, jsonl([chat_line("one")]))
    made = []
    for _ in range(3):
        made.append(client.batches.create(input_file_id=file_id, endpoint=CHAT,
                                          completion_window="24h").id)  # fmt: skip
        time.sleep(1.05)  # created_at is in seconds
    newest_first = list(reversed(made))

    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == newest_first[:2] and page.has_more
    rest = client.batches.list(limit=2, after=newest_first[1])
    assert [b.id for b in rest.data] == newest_first[2:] and not rest.has_more
    assert [b.id for b in client.batches.list()] == newest_first  # the SDK's paging


def test_a_batch_past_its_completion_window_expires_keeping_what_finished(
    dmr_server_factory: ServerFactory,
) -> None:
    served = dmr_server_factory(DMR_BATCH_CONCURRENCY="2")
    add_test_model(served.models_path, "test/a")
    client = client_of(served)
    lines = [chat_line(f"slow-{i}", sleep=0.4) for i in range(40)]  # ~8 s at 2 at a time
    batch = client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint=CHAT, completion_window="3s"
    )
    batch = wait_ended(client, batch.id)

    assert batch.status == "expired" and batch.expired_at
    outputs = results(client, batch.output_file_id)
    errors = results(client, batch.error_file_id)
    assert 0 < len(outputs) < 40
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert Counter(line["custom_id"] for line in outputs + errors) == Counter(
        f"slow-{i}" for i in range(40)
    )


def test_cancelling_a_running_batch_stops_it(dmr_server_factory: ServerFactory) -> None:
    served = dmr_server_factory(DMR_BATCH_CONCURRENCY="2")
    add_test_model(served.models_path, "test/a")
    client = client_of(served)
    lines = [chat_line(f"slow-{i}", sleep=0.3) for i in range(40)]
    batch = client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint=CHAT, completion_window="24h"
    )
    wait_for(
        lambda: (client.batches.retrieve(batch.id).request_counts or batch).completed >= 2,  # type: ignore[union-attr]
        message="two lines done",
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    batch = wait_ended(client, batch.id, timeout=10)

    assert batch.status == "cancelled" and batch.cancelled_at
    done = results(client, batch.output_file_id)
    assert 2 <= len(done) < 40
    time.sleep(1.0)  # nothing more is sent once cancelled
    assert client.batches.retrieve(batch.id).request_counts.completed == len(done)  # type: ignore[union-attr]


def test_a_server_killed_mid_batch_resumes_it_without_losing_or_repeating_a_line(
    tmp_path: Path,
) -> None:
    env = {"DMR_BATCH_CONCURRENCY": "4"}
    server = start_server(tmp_path, env)
    add_test_model(server.models_path, "test/a")
    lines = [chat_line(f"line-{i}", sleep=0.2) for i in range(60)]
    try:
        client = client_of(server)
        batch = client.batches.create(
            input_file_id=upload(client, jsonl(lines)), endpoint=CHAT, completion_window="24h"
        )
        wait_for(
            lambda: (client.batches.retrieve(batch.id).request_counts or batch).completed >= 10,  # type: ignore[union-attr]
            message="ten lines done",
        )
        os.kill(server.process.pid, signal.SIGKILL)  # no chance to save anything
        server.process.wait(timeout=10)
    finally:
        server.stop()

    restarted = start_server(tmp_path, env)
    try:
        client = client_of(restarted)
        batch = wait_ended(client, batch.id)
        assert batch.status == "completed", batch
        outputs = results(client, batch.output_file_id)
        errors = results(client, batch.error_file_id)
        assert errors == []
        assert Counter(line["custom_id"] for line in outputs) == Counter(
            f"line-{i}" for i in range(60)
        )
        assert "resuming " + batch.id in restarted.log()
    finally:
        restarted.stop()


def test_a_disk_that_fills_fails_the_batch_and_keeps_the_lines_written(tmp_path: Path) -> None:
    """The server may write no file over 64 KiB (RLIMIT_FSIZE, a real write error:
    EFBIG, which dmr treats as a full disk). Each answer is ~14 KiB of embeddings."""
    limit = ("prlimit", f"--fsize={64 * 1024}", "--")
    server = start_server(tmp_path, {"DMR_BATCH_CONCURRENCY": "1"}, argv_prefix=limit)
    add_test_model(server.models_path, "test/a")
    lines = [
        {
            "custom_id": f"embed-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "test/a", "input": ["word"] * 200},
        }
        for i in range(12)
    ]
    try:
        client = client_of(server)
        batch = client.batches.create(
            input_file_id=upload(client, jsonl(lines)),
            endpoint="/v1/embeddings",
            completion_window="24h",
        )
        batch = wait_ended(client, batch.id)
        assert batch.status == "failed", batch
        assert batch.errors is not None and batch.errors.data is not None
        (error,) = batch.errors.data
        assert error.code == "disk_full" and "no room" in (error.message or "")
        written = results(client, batch.output_file_id)  # every line whole and readable
        assert 1 <= len(written) < 12
        assert all(len(line["response"]["body"]["data"]) == 200 for line in written)
    finally:
        server.stop()


def test_an_upload_over_the_limit_is_413(dmr_server_factory: ServerFactory) -> None:
    served = dmr_server_factory(DMR_FILES_MAX_BYTES="1000")
    with pytest.raises(openai.APIStatusError) as refused:
        client_of(served).files.create(file=("big", io.BytesIO(b"x" * 5000)), purpose="batch")
    assert refused.value.status_code == 413
    assert "DMR_FILES_MAX_BYTES" in refused.value.message


def test_a_waiting_batch_line_never_holds_back_interactive_requests(
    dmr_server_factory: ServerFactory,
) -> None:
    """Budget for one runner. Interactive clients keep test/a busy; a batch for test/b
    waits far past the fair wait, yet interactive requests keep being admitted at
    once (an interactive request in its place would have held them back), and the
    batch never evicts a between two of their requests. It gets b's turn once a has
    been idle for DMR_BATCH_EVICT_AFTER_SECONDS."""
    served = dmr_server_factory(
        DMR_MEMORY_BUDGET=str(10 * MiB),
        DMR_FAIR_WAIT_SECONDS="0.5",
        DMR_BATCH_EVICT_AFTER_SECONDS="2",
    )
    for name in ("a", "b"):
        add_test_model(served.models_path, f"test/{name}", memory=8 * MiB)
    client = client_of(served)
    stop = threading.Event()
    latencies: list[float] = []

    def interactive() -> None:
        with served.client() as http:
            while not stop.is_set():
                began = time.monotonic()
                body = chat_body("test/a", stream=True, test={"chunks": 5, "sleep": 0.1})
                with http.stream("POST", "/engines/v1/chat/completions", json=body) as answer:
                    for _ in answer.iter_lines():
                        pass
                latencies.append(time.monotonic() - began)

    threads = [threading.Thread(target=interactive) for _ in range(3)]
    for index, thread in enumerate(threads):
        thread.start()
        time.sleep(0.15 * index)
    try:
        wait_for(lambda: len(latencies) >= 3, message="interactive clients to run")
        batch = client.batches.create(
            input_file_id=upload(client, jsonl([chat_line("b-1", model="test/b")])),
            endpoint=CHAT,
            completion_window="24h",
        )
        time.sleep(3.0)  # six fair waits
        assert client.batches.retrieve(batch.id).request_counts.completed == 0  # type: ignore[union-attr]
        recent = latencies[-6:]
        assert max(recent) < 2.0, recent  # never queued behind the batch line
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert wait_ended(client, batch.id).status == "completed"


@pytest.fixture
def metrics_text(server: DmrServer) -> Iterator[Callable[[], str]]:
    yield lambda: httpx.get(server.url + "/metrics", timeout=10).text


def test_metrics_count_batch_lines(server: DmrServer, metrics_text: Callable[[], str]) -> None:
    client = client_of(server)
    lines = [chat_line("ok-1"), chat_line("ok-2"), chat_line("missing", model="nobody/x")]
    batch = client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint=CHAT, completion_window="24h"
    )
    wait_ended(client, batch.id)
    text = metrics_text()
    assert 'dmr_batch_requests_total{outcome="completed"} 2.0' in text
    assert 'dmr_batch_requests_total{outcome="failed"} 1.0' in text
    assert "dmr_batch_queue_depth 0.0" in text and "dmr_batches_active 0.0" in text


def test_the_batch_cli_creates_follows_lists_and_writes_results(
    server: DmrServer, tmp_path: Path
) -> None:
    source = tmp_path / "requests.jsonl"
    source.write_bytes(jsonl([chat_line("cli-1"), chat_line("cli-2"), "not json"]))

    created = server.cli("batch", "create", str(source), "--metadata", "owner=cli")

    assert created.returncode == 0, created.stderr  # completed, with one line failed
    assert "completed, 2 completed, 1 failed of 3" in created.stdout
    (batch_id,) = re.findall(r"^(batch_\w+): completed", created.stdout, re.MULTILINE)
    listed = server.cli("batch", "ls")
    assert batch_id in listed.stdout and "completed" in listed.stdout
    inspected = json.loads(server.cli("batch", "inspect", batch_id).stdout)
    assert inspected["metadata"] == {"owner": "cli"}
    target = tmp_path / "out.jsonl"
    written = server.cli("batch", "results", batch_id, "-o", str(target))
    assert written.returncode == 0 and "wrote 2 lines" in written.stdout
    assert {json.loads(line)["custom_id"] for line in target.read_text().splitlines()} == {
        "cli-1", "cli-2"
    }  # fmt: skip
    errors = server.cli("batch", "results", batch_id, "--errors")
    assert "invalid_json" in errors.stdout
    refused = server.cli("batch", "cancel", batch_id)
    assert refused.returncode == 1 and "Cannot cancel a batch with status 'completed'" in (
        refused.stderr
    )
    missing = server.cli("batch", "inspect", "batch_nothing")
    assert missing.returncode == 1 and "No such Batch object" in missing.stderr


@pytest.mark.parametrize(
    ("endpoint", "body", "answer_object"),
    [
        ("/v1/completions", {"prompt": "once upon"}, "text_completion"),
        ("/v1/responses", {"input": "hello there"}, "response"),
        ("/v1/embeddings", {"input": ["a", "b"]}, "list"),
    ],
)
def test_every_batch_endpoint_answers(
    server: DmrServer, endpoint: str, body: dict[str, Any], answer_object: str
) -> None:
    client = client_of(server)
    lines = [
        {"custom_id": f"{i}", "method": "POST", "url": endpoint,
         "body": {"model": "test/a", **body}}
        for i in range(3)
    ]  # fmt: skip
    batch = client.batches.create(
        input_file_id=upload(client, jsonl(lines)),
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )
    batch = wait_ended(client, batch.id)
    assert batch.status == "completed", batch
    outputs = results(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in outputs) == ["0", "1", "2"]
    assert {line["response"]["body"]["object"] for line in outputs} == {answer_object}


@pytest.mark.parametrize("file_id", ["a" * 400, "file_..", "file_0123", "file_" + "z" * 24])
def test_a_file_id_that_is_not_one_is_404(server: DmrServer, file_id: str) -> None:
    for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        answer = httpx.request(method, f"{server.url}/v1/files/{file_id}{path}", timeout=30)
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["error"]["message"].startswith("No such File object")
