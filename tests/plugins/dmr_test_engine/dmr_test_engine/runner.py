"""The test engine's runner: an OpenAI-shaped echo server on a unix socket.

It follows dmr's runner protocol (GET /health, POST /v1/chat/completions with
SSE streaming, /v1/completions, /v1/embeddings, GET /v1/models, /metrics) and
adds GET /test/info (argv, pid, requests in flight, streams the client left).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any


class State:
    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.argv = argv
        self.ready = False
        self.lock = threading.Lock()
        self.active = 0
        self.served = 0
        self.cancelled = 0


STATE: State


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 made the 6th of a burst of connections (a
    # batch, or clients that waited for the load) fail with "connection lost".
    request_queue_size = 128

    def get_request(self) -> tuple[Any, Any]:
        request, _ = super().get_request()
        # BaseHTTPRequestHandler expects an (address, port) client address.
        return request, ("runner", 0)


def reply_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        last = messages[-1].get("content", "") if messages else ""
        system = [m.get("content") for m in messages if m.get("role") == "system"]
        prefix = f"[{len(messages)} messages"
        if system:
            prefix += f", system={system[-1]}"
        return f"{prefix}] echo: {last}"
    return f"echo: {body.get('prompt', '')}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the runner's log for errors

    def send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            if STATE.ready:
                self.send_json(200, {"status": "ok"})
            else:
                self.send_json(503, {"status": "loading"})
        elif self.path == "/v1/models":
            name = STATE.args.model_name
            self.send_json(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
        elif self.path == "/test/info":
            with STATE.lock:
                info = {
                    "argv": STATE.argv,
                    "pid": os.getpid(),
                    "active": STATE.active,
                    "served": STATE.served,
                    "cancelled": STATE.cancelled,
                }
            self.send_json(200, info)
        elif self.path == "/metrics":
            time.sleep(STATE.args.metrics_sleep)  # a runner too busy to answer in time
            data = f"testengine_requests_total {STATE.served}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self.send_json(400, {"error": {"message": "invalid JSON"}})
            return
        test = body.get("test") or {}
        if not test and "[slow]" in json.dumps(body.get("messages") or body.get("prompt")):
            # Clients that cannot add a "test" field (the dmr CLI) ask for a slow stream so.
            test = {"sleep": 0.4}
        if not test and "[die]" in json.dumps(body.get("messages") or body.get("prompt")):
            test = {"die_after": 2, "sleep": 0.1}  # ... or for a runner dying mid-stream
        if test.get("crash"):
            sys.stderr.write(str(test["crash"]) + "\n")
            sys.stderr.flush()
            os._exit(1)
        with STATE.lock:
            STATE.active += 1
        try:
            if self.path in ("/v1/chat/completions", "/v1/completions"):
                self.complete(body, test)
            elif self.path == "/v1/embeddings":
                inputs = body.get("input")
                items = inputs if isinstance(inputs, list) else [inputs]
                data = [
                    {"object": "embedding", "index": i, "embedding": [float(len(str(x))), 1.0]}
                    for i, x in enumerate(items)
                ]
                self.send_json(200, {"object": "list", "data": data, "model": body.get("model")})
            else:
                self.send_json(404, {"error": {"message": f"no route {self.path}"}})
        finally:
            with STATE.lock:
                STATE.active -= 1
                STATE.served += 1

    def complete(self, body: dict[str, Any], test: dict[str, Any]) -> None:
        text = reply_text(body)
        for name in test.get("echo_headers") or ():  # what the server sent the runner
            text += f" {name}={self.headers.get(name, '-')}"
        chat = self.path == "/v1/chat/completions"
        created = int(time.time())
        if not body.get("stream"):
            time.sleep(float(test.get("sleep", 0)))
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text}}
                if chat
                else {"index": 0, "text": text}
            )
            choice["finish_reason"] = "stop"
            self.send_json(
                200,
                {
                    "id": "test-1",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": body.get("model"),
                    "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            )
            return
        chunks = int(test.get("chunks", 0))
        pieces = [f"tick{i} " for i in range(chunks)] if chunks else text.split(" ")
        pieces = [
            p if p.endswith(" ") or i == len(pieces) - 1 else p + " " for i, p in enumerate(pieces)
        ]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for index, piece in enumerate(pieces):
                if index == test.get("die_after"):
                    sys.stderr.write("GGML_ASSERT: the test runner gave up\n")
                    sys.stderr.flush()
                    os._exit(1)
                delta = {"content": piece}
                event = {
                    "id": "test-1",
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": body.get("model"),
                    "choices": [
                        {"index": 0, "delta": delta, "finish_reason": None}
                        if chat
                        else {"index": 0, "text": piece, "finish_reason": None}
                    ],
                }
                self.write_chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
                time.sleep(float(test.get("sleep", 0)))
            self.write_chunk(b"data: [DONE]\n\n")
            self.write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            with STATE.lock:
                STATE.cancelled += 1
            self.close_connection = True

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def main(argv: list[str] | None = None) -> None:
    global STATE
    raw = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="dmr_test_engine.runner")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--model-name", default="test")
    parser.add_argument("--mode", default="completion")
    parser.add_argument("--load-seconds", type=float, default=0.0)
    parser.add_argument("--fail-load")
    parser.add_argument("--ctx-size", type=int)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--metrics-sleep", type=float, default=0.0)
    parser.add_argument("flags", nargs="*")
    args = parser.parse_args(raw)
    STATE = State(args, raw)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a runner that will not stop politely
    server = UnixHTTPServer(args.socket, Handler)

    def load() -> None:
        time.sleep(args.load_seconds)
        if args.fail_load:
            sys.stderr.write(args.fail_load + "\n")
            sys.stderr.flush()
            os._exit(1)
        STATE.ready = True
        print(f"test runner ready: {args.model_name} ({args.mode})", flush=True)

    threading.Thread(target=load, daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
