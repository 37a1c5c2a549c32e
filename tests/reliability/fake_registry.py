"""A registry that misbehaves on purpose: the OCI distribution routes a pull uses,
serving one artifact, with switches for the faults a real network produces."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class FakeRegistry:
    manifest: bytes
    blobs: dict[str, bytes]
    host: str = ""
    # Faults.
    drop_blobs: bool = False  # every blob body stops half-way and the connection closes
    corrupt_blobs: bool = False  # one byte flipped, same size
    manifest_declared_size: int | None = None  # a Content-Length this large, then close
    manifest_endless: bool = False  # chunked, no length, more than any cap
    bytes_per_second: float | None = None  # slow blob bodies down (read at each chunk)
    blob_gets: int = 0
    layer_gets: int = 0  # GETs of blobs over 1000 bytes: the layers, not the small config
    ranges: list[tuple[str, str | None]] = field(default_factory=list)  # (digest, Range) per GET
    lock: threading.Lock = field(default_factory=threading.Lock)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header.removeprefix("bytes=").split("-", 1)[0] or 0)


def _handler(registry: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/v2/":
                return self._send(200, b"{}", "application/json")
            if "/manifests/" in path:
                return self._manifest()
            if "/blobs/" in path:
                return self._blob(path.rsplit("/", 1)[1])
            return self._send(404, b'{"errors":[]}', "application/json")

        def _manifest(self) -> None:
            if registry.manifest_declared_size is not None:
                self.send_response(200)
                self.send_header("Content-Type", MANIFEST_TYPE)
                self.send_header("Content-Length", str(registry.manifest_declared_size))
                self.end_headers()
                self.wfile.write(b'{"schemaVersion": 2, "layers": [' + b" " * 65536)
                self.close_connection = True
                return
            if registry.manifest_endless:
                self.send_response(200)
                self.send_header("Content-Type", MANIFEST_TYPE)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b" " * 65536
                try:
                    for _ in range(1024):  # 64 MiB at most, far past the 4 MiB cap
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True
                return
            self._send(
                200,
                registry.manifest,
                MANIFEST_TYPE,
                {"Docker-Content-Digest": digest_of(registry.manifest)},
            )

        def _blob(self, digest: str) -> None:
            data = registry.blobs.get(digest)
            if data is None:
                return self._send(404, b'{"errors":[]}', "application/json")
            if self.command == "GET":
                with registry.lock:
                    registry.blob_gets += 1
                    registry.layer_gets += len(data) > 1000
                    registry.ranges.append((digest, self.headers.get("Range")))
            if registry.corrupt_blobs and len(data) > 1000:
                flipped = bytearray(data)
                flipped[len(data) // 2] ^= 0xFF
                data = bytes(flipped)
            if registry.drop_blobs and self.command == "GET" and len(data) > 1000:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            start = _range_start(self.headers.get("Range"))
            if self.command == "HEAD" or (start == 0 and not registry.bytes_per_second):
                return self._send(
                    200, data, "application/octet-stream", {"Docker-Content-Digest": digest}
                )
            self.send_response(206 if start else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            try:
                for offset in range(start, len(data), 65536):
                    self.wfile.write(data[offset : offset + 65536])
                    rate = registry.bytes_per_second
                    if rate:
                        time.sleep(65536 / rate)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _send(
            self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


@contextmanager
def serve(registry: FakeRegistry) -> Iterator[FakeRegistry]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(registry))
    server.daemon_threads = True
    registry.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-registry", daemon=True)
    thread.start()
    try:
        yield registry
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
