"""Batches: kept on disk, run through the server's own routes at batch priority,
resumed after a restart.

Each line is sent to the app itself (httpx's ASGI transport: no socket, and the
same checks, model lookup, metrics and runners as any client's request) with
`request_priority` set to BATCH, so the scheduler serves interactive requests
first (docs/scheduler.md, "Waiting for memory"; docs/batch.md).

On disk, under `<models>/batch/batches/`: `<id>.json` (the batch object, replaced
whole at each change of status) and `<id>.output.part` / `<id>.errors.part`, one
line per finished request, flushed and fsynced before the next is counted. A
restart reads those back: a line is done when its fixed `id` is there, so each
`custom_id` is written exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from dmr.sdk import ConflictError, DmrError, InvalidRequestError, Priority, request_priority
from dmr.sdk.dialect import parse_duration

from dmr_apis.batch.files import FileNotFound, FileStore, new_id, write_json
from dmr_apis.batch.lines import (
    ENDPOINTS,
    BatchLine,
    error_line,
    output_line,
    parse_input,
    request_id,
)

__all__ = ["BatchNotFound", "BatchService", "BatchSettings"]

log = logging.getLogger(__name__)

TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})
# Write errors that mean "no room": the batch fails, what was written stays.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


class BatchNotFound(DmrError):
    status = 404
    code = "not_found"


class NoRoom(Exception):
    """Writing a result failed for lack of disk space."""


@dataclass(frozen=True)
class BatchSettings:
    max_file_bytes: int = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
    max_lines: int = 50_000  # OpenAI's requests per batch
    concurrency: int = 8  # lines in flight per batch: the llama.cpp runner's slots

    @classmethod
    def from_env(cls) -> BatchSettings:
        env = os.environ
        return cls(
            max_file_bytes=int(env.get("DMR_FILES_MAX_BYTES", cls.max_file_bytes)),
            max_lines=int(env.get("DMR_BATCH_MAX_LINES", cls.max_lines)),
            concurrency=max(1, int(env.get("DMR_BATCH_CONCURRENCY", cls.concurrency))),
        )


@dataclass
class _Progress:
    """A running batch's live state beside its persisted object."""

    pending: int = 0
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class BatchService:
    def __init__(
        self,
        root: Path,
        files: FileStore,
        app: Callable[..., Any],
        settings: BatchSettings,
        api_key: str | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.files = files
        self.settings = settings
        self._app = app
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._progress: dict[str, _Progress] = {}
        # Read by /metrics: lines answered (by outcome), 503s retried.
        self.counters: dict[str, int] = {"completed": 0, "failed": 0, "retried": 0}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load every batch; those a stop interrupted carry on where they were."""
        for path in sorted(self.root.glob("batch_*.json")):
            try:
                batch = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                log.error("skipping unreadable batch %s: %s", path.name, error)
                continue
            self._batches[batch["id"]] = batch
            if batch["status"] not in TERMINAL:
                log.info("resuming %s (%s)", batch["id"], batch["status"])
                self._launch(batch["id"])

    async def aclose(self) -> None:
        """Stop running batches without changing their status: the next start resumes."""
        tasks = [p.task for p in self._progress.values() if p.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ API

    def create(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
    ) -> dict[str, Any]:
        if endpoint not in ENDPOINTS:
            raise InvalidRequestError(
                f"'endpoint' must be one of {', '.join(ENDPOINTS)}, not {endpoint!r}"
            )
        try:
            window = parse_duration(completion_window)
        except ValueError:
            window = 0
        if window <= 0:
            raise InvalidRequestError(
                f"'completion_window' must be a duration such as '24h', not {completion_window!r}"
            )
        try:
            stored = self.files.get(input_file_id)
        except FileNotFound:
            raise InvalidRequestError(f"input file {input_file_id!r} does not exist") from None
        if stored.purpose != "batch":
            raise InvalidRequestError(
                f"input file {input_file_id!r} has purpose {stored.purpose!r}, not 'batch'"
            )
        now = int(time.time())
        batch: dict[str, Any] = {
            "id": new_id("batch"),
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + int(window),
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        self._batches[batch["id"]] = batch
        self._save(batch)
        self._launch(batch["id"])
        return batch

    def get(self, batch_id: str) -> dict[str, Any]:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise BatchNotFound(f"No such Batch object: {batch_id}")
        return batch

    def newest_first(self) -> list[dict[str, Any]]:
        """As OpenAI lists them."""
        batches = self._batches.values()
        return sorted(batches, key=lambda b: (b["created_at"], b["id"]), reverse=True)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        batch = self.get(batch_id)
        if batch["status"] in TERMINAL:
            raise ConflictError(f"Cannot cancel a batch with status '{batch['status']}'.")
        if batch["status"] != "cancelling":
            batch["status"] = "cancelling"
            batch["cancelling_at"] = int(time.time())
            self._save(batch)
            progress = self._progress.get(batch_id)
            if progress is not None:
                progress.cancel.set()
        return batch

    def pending_lines(self) -> int:
        return sum(progress.pending for progress in self._progress.values())

    def active(self) -> int:
        return sum(1 for b in self._batches.values() if b["status"] not in TERMINAL)

    # ------------------------------------------------------------------ running

    def _launch(self, batch_id: str) -> None:
        progress = self._progress.setdefault(batch_id, _Progress())
        if self._batches[batch_id]["status"] == "cancelling":
            progress.cancel.set()
        progress.task = asyncio.create_task(self._run(batch_id), name=f"batch {batch_id}")

    async def _run(self, batch_id: str) -> None:
        # Every request this task (and the tasks it starts) sends waits behind
        # interactive ones.
        request_priority.set(Priority.BATCH)
        batch = self._batches[batch_id]
        progress = self._progress[batch_id]
        writer = _ResultWriter(self.root, batch_id)
        try:
            lines = self._prepare(batch, writer)
            if lines is None:
                return
            done = writer.done_ids()
            pending = [line for line in lines if request_id(batch_id, line.number) not in done]
            outcome = await self._dispatch(batch, progress, writer, pending)
            if outcome == "expired":
                for line in pending:
                    if request_id(batch_id, line.number) not in writer.done_ids():
                        writer.error(
                            error_line(
                                batch_id, line.number, line.custom_id, "batch_expired",
                                _EXPIRED_MESSAGE,
                            )
                        )  # fmt: skip
            self._finish(batch, writer, outcome)
        except NoRoom as error:
            writer.trim()
            self._fail(batch, "disk_full", str(error), writer)
        except asyncio.CancelledError:
            raise  # the server stops: the status stays, the next start resumes
        except Exception as error:  # a bug must not leave the batch running for ever
            log.exception("batch %s failed", batch_id)
            self._fail(batch, "internal_error", f"the batch stopped: {error}", writer)
        finally:
            writer.close()
            progress.pending = 0

    def _prepare(self, batch: dict[str, Any], writer: _ResultWriter) -> list[BatchLine] | None:
        """Read and check the input file; the lines still to send, or None when the
        whole batch failed. Validation is repeated on resume (it is deterministic)."""
        batch_id = batch["id"]
        try:
            data = self.files.data_path(batch["input_file_id"]).read_bytes()
        except OSError:
            self._fail(batch, "missing_file", "the input file is gone", writer)
            return None
        lines, problems = parse_input(data, batch["endpoint"])
        total = len(lines) + len(problems)
        if total == 0:
            self._fail(batch, "empty_file", "the input file has no lines", writer)
            return None
        if total > self.settings.max_lines:
            self._fail(
                batch,
                "too_many_requests",
                f"the input file has {total} lines; a batch takes at most "
                f"{self.settings.max_lines} (DMR_BATCH_MAX_LINES)",
                writer,
            )
            return None
        if batch["status"] == "validating":
            writer.reset()
            batch["status"] = "in_progress"
            batch["in_progress_at"] = int(time.time())
        batch["request_counts"]["total"] = total
        done = writer.done_ids()
        for problem in problems:
            if request_id(batch_id, problem.number) not in done:
                writer.error(
                    error_line(batch_id, problem.number, problem.custom_id, problem.code,
                               problem.message)
                )  # fmt: skip
        self._count(batch, writer)
        self._save(batch)
        return lines

    async def _dispatch(
        self,
        batch: dict[str, Any],
        progress: _Progress,
        writer: _ResultWriter,
        pending: list[BatchLine],
    ) -> str:
        """Send the lines; "done", "cancelled" or "expired"."""
        progress.pending = len(pending)
        queue: asyncio.Queue[BatchLine] = asyncio.Queue()
        for line in pending:
            queue.put_nowait(line)
        transport = httpx.ASGITransport(app=self._app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://dmr-batch", timeout=None
        ) as client:

            async def worker() -> None:
                while not queue.empty():
                    line = queue.get_nowait()
                    await self._send(client, batch, writer, line)
                    progress.pending -= 1
                    self._count(batch, writer)

            workers: asyncio.Future[Any] = asyncio.gather(
                *(worker() for _ in range(self.settings.concurrency))
            )
            cancelled: asyncio.Future[Any] = asyncio.ensure_future(progress.cancel.wait())
            remaining = batch["expires_at"] - time.time()
            try:
                finished, _ = await asyncio.wait(
                    {workers, cancelled},
                    timeout=max(remaining, 0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            except asyncio.CancelledError:
                workers.cancel()
                cancelled.cancel()
                with contextlib.suppress(BaseException):
                    await workers
                raise
            cancelled.cancel()
            if workers in finished:
                workers.result()  # NoRoom and bugs go up
                return "done"
            workers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await workers
            return "cancelled" if progress.cancel.is_set() else "expired"

    async def _send(
        self,
        client: httpx.AsyncClient,
        batch: dict[str, Any],
        writer: _ResultWriter,
        line: BatchLine,
    ) -> None:
        body = {**line.body, "stream": False}
        while True:
            try:
                answer = await client.post(batch["endpoint"], json=body, headers=self._headers)
            except httpx.HTTPError as error:
                writer.error(
                    error_line(batch["id"], line.number, line.custom_id, "request_failed",
                               f"the request failed: {error}")
                )  # fmt: skip
                return
            if answer.status_code == 503:
                # Busy (a full queue) is not the line's fault: wait as told, then retry.
                self.counters["retried"] += 1
                await asyncio.sleep(float(answer.headers.get("Retry-After", "1") or 1))
                continue
            break
        try:
            answer_body: Any = answer.json()
        except ValueError:
            answer_body = answer.text
        result = output_line(batch["id"], line.number, line.custom_id, answer.status_code,
                             answer_body)  # fmt: skip
        if 200 <= answer.status_code < 300:
            writer.output(result)
            self.counters["completed"] += 1
        else:
            writer.error(result)
            self.counters["failed"] += 1

    # ------------------------------------------------------------------ endings

    def _count(self, batch: dict[str, Any], writer: _ResultWriter) -> None:
        batch["request_counts"]["completed"] = writer.outputs
        batch["request_counts"]["failed"] = writer.errors

    def _finish(self, batch: dict[str, Any], writer: _ResultWriter, outcome: str) -> None:
        now = int(time.time())
        if outcome == "done":
            batch["status"] = "finalizing"
            batch["finalizing_at"] = now
            self._save(batch)
        self._count(batch, writer)
        self._publish(batch, writer)
        status = {"done": "completed", "cancelled": "cancelled", "expired": "expired"}[outcome]
        batch["status"] = status
        batch[f"{status}_at"] = int(time.time())
        self._save(batch)
        log.info("batch %s %s: %s", batch["id"], status, batch["request_counts"])

    def _fail(self, batch: dict[str, Any], code: str, message: str, writer: _ResultWriter) -> None:
        batch["errors"] = {
            "object": "list",
            "data": [{"code": code, "message": message, "param": None, "line": None}],
        }
        self._count(batch, writer)
        with contextlib.suppress(OSError):
            self._publish(batch, writer)
        batch["status"] = "failed"
        batch["failed_at"] = int(time.time())
        try:
            self._save(batch)
        except OSError as error:
            log.error("batch %s failed and could not be saved: %s", batch["id"], error)
        log.error("batch %s failed: %s", batch["id"], message)

    def _publish(self, batch: dict[str, Any], writer: _ResultWriter) -> None:
        """The results become files of purpose `batch_output` (renames, no copies)."""
        writer.close()
        for kind, path in (("output", writer.output_path), ("error", writer.errors_path)):
            if path.exists() and path.stat().st_size > 0:
                stored = self.files.adopt(path, f"{batch['id']}_{kind}.jsonl", "batch_output")
                batch[f"{kind}_file_id"] = stored.id

    def _save(self, batch: dict[str, Any]) -> None:
        try:
            write_json(self.root / f"{batch['id']}.json", batch)
        except OSError as error:
            if error.errno in _NO_ROOM:
                raise NoRoom(f"no room to save the batch: {error.strerror}") from error
            raise


class _ResultWriter:
    """Appends result lines to a batch's two part files, each fsynced at once."""

    def __init__(self, root: Path, batch_id: str) -> None:
        self.output_path = root / f"{batch_id}.output.part"
        self.errors_path = root / f"{batch_id}.errors.part"
        self._files: dict[Path, Any] = {}
        self.outputs = 0
        self.errors = 0
        self._done: set[str] | None = None

    def reset(self) -> None:
        self.close()
        for path in (self.output_path, self.errors_path):
            path.unlink(missing_ok=True)
        self._done = set()
        self.outputs = self.errors = 0

    def trim(self) -> None:
        """Cut a line a failed write left half-written, so every line stays whole."""
        self.close()
        for path in (self.output_path, self.errors_path):
            if path.exists():
                data = path.read_bytes()
                if data and not data.endswith(b"\n"):
                    with path.open("r+b") as out:
                        out.truncate(data.rfind(b"\n") + 1)

    def done_ids(self) -> set[str]:
        if self._done is None:
            self.trim()  # a kill mid-write
            self._done = set()
            self.outputs = self._read_ids(self.output_path)
            self.errors = self._read_ids(self.errors_path)
        return self._done

    def _read_ids(self, path: Path) -> int:
        assert self._done is not None
        count = 0
        if path.exists():
            for raw in path.read_bytes().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self._done.add(json.loads(raw)["id"])
                    count += 1
        return count

    def output(self, line: dict[str, Any]) -> None:
        self._append(self.output_path, line)
        self.outputs += 1

    def error(self, line: dict[str, Any]) -> None:
        self._append(self.errors_path, line)
        self.errors += 1

    def _append(self, path: Path, line: dict[str, Any]) -> None:
        self.done_ids().add(line["id"])
        out = self._files.get(path)
        try:
            if out is None:
                out = self._files[path] = path.open("ab")
            out.write(json.dumps(line).encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())
        except OSError as error:
            if error.errno in _NO_ROOM:
                raise NoRoom(f"no room to write the results: {error.strerror}") from error
            raise

    def close(self) -> None:
        for out in self._files.values():
            with contextlib.suppress(OSError):
                out.close()
        self._files.clear()
