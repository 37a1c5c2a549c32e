"""The CLI's HTTP client: the standard library's `http.client`, over a unix socket or TCP.

Why not httpx, which the server and the tests use: importing httpx costs the CLI
150-200 ms on a 2-core machine (it imports its own CLI, rich and click, certifi
and ssl), more than a whole `dmr ls` may take (docs/benchmarks.md). `http.client`
needs about 10 ms.
This module gives the few calls the commands make - JSON requests, a streamed
upload, a streamed answer read line by line - with httpx's names, so a command
reads the same whichever client it had.
"""

from __future__ import annotations

import http.client
import json as jsonlib
import socket
import ssl
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode, urlsplit

__all__ = ["HTTPError", "ServerClient", "ServerResponse", "TransportError", "ndjson_events"]

# How long to wait for a connection: a local server accepts at once or not at all.
CONNECT_TIMEOUT = 5.0


class _ClientTimeout:
    """The `timeout` default: the client's own (None, as in httpx, means no limit)."""


CLIENT_TIMEOUT = _ClientTimeout()
Timeout = float | None | _ClientTimeout


class HTTPError(Exception):
    """Any failure talking to the server (httpx's `HTTPError`, by name)."""


class TransportError(HTTPError):
    """The server could not be reached, or the connection broke."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float | None) -> None:
        super().__init__("dmr", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        self.sock = sock


class ServerResponse:
    """A response; its body is read at once unless it came from `ServerClient.stream`."""

    def __init__(self, raw: http.client.HTTPResponse, *, streamed: bool = False) -> None:
        self._raw = raw
        self.status_code = raw.status
        self.reason_phrase = raw.reason
        self.headers = {key.lower(): value for key, value in raw.getheaders()}
        self._content: bytes | None = None if streamed else self._read_all()

    def _read_all(self) -> bytes:
        try:
            return self._raw.read()
        except (OSError, http.client.HTTPException) as error:
            raise TransportError(f"the connection broke: {error}") from error

    def read(self) -> bytes:
        if self._content is None:
            self._content = self._read_all()
        return self._content

    @property
    def content(self) -> bytes:
        return self.read()

    @property
    def text(self) -> str:
        return self.read().decode(errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.read())

    def iter_lines(self) -> Iterator[str]:
        """The body's lines as they arrive (server-sent events, NDJSON progress)."""
        if self._content is not None:
            yield from self._content.decode(errors="replace").splitlines()
            return
        try:
            for line in self._raw:
                yield line.decode(errors="replace").rstrip("\r\n")
        except (OSError, http.client.HTTPException) as error:
            raise TransportError(f"the connection broke: {error}") from error

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise HTTPError(f"the server answered {self.status_code} {self.reason_phrase}")


class ServerClient:
    """A client bound to one server: `http://host:port` or a unix socket."""

    def __init__(
        self,
        base_url: str,
        *,
        socket_path: str | None = None,
        timeout: float | None = 30.0,
        headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._ssl_context = ssl_context
        self._socket_path = socket_path
        self._timeout = timeout
        self._headers = dict(headers or {})
        parts = urlsplit(self.base_url)
        self._scheme = parts.scheme or "http"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._connection: http.client.HTTPConnection | None = None

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        self.close()  # one request per connection: streamed answers end with the connection
        connection: http.client.HTTPConnection
        if self._socket_path is not None:
            connection = _UnixConnection(self._socket_path, timeout)
        elif self._scheme == "https":
            connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._ssl_context
            )
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        self._connection = connection
        return connection

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None,
        json: Any,
        content: bytes | Iterable[bytes] | None,
        headers: Mapping[str, str] | None,
        timeout: Timeout,
    ) -> http.client.HTTPResponse:
        url = self._prefix + path
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        all_headers = {"Accept-Encoding": "identity", **self._headers, **(headers or {})}
        body: bytes | Iterable[bytes] | None = content
        chunked = False
        if json is not None:
            body = jsonlib.dumps(json).encode()
            all_headers["Content-Type"] = "application/json"
        elif content is not None and not isinstance(content, bytes):
            chunked = True  # an upload of unknown length, sent as it is produced
            all_headers["Transfer-Encoding"] = "chunked"
        wait = self._timeout if isinstance(timeout, _ClientTimeout) else timeout
        connection = self._connect(wait)
        try:
            connection.request(method, url, body=body, headers=all_headers, encode_chunked=chunked)
            return connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            self.close()
            where = f"unix socket {self._socket_path}" if self._socket_path else self.base_url
            raise TransportError(f"cannot reach the dmr server at {where}: {error}") from error

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | Iterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> ServerResponse:
        raw = self._send(
            method,
            path,
            params=params,
            json=json,
            content=content,
            headers=headers,
            timeout=timeout,
        )
        return ServerResponse(raw)

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> Iterator[ServerResponse]:
        """A response whose body is read as it arrives (`iter_lines`)."""
        raw = self._send(
            method, path, params=params, json=json, content=None, headers=headers, timeout=timeout
        )
        try:
            yield ServerResponse(raw, streamed=True)
        finally:
            self.close()

    def get(self, path: str, **kwargs: Any) -> ServerResponse:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> ServerResponse:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> ServerResponse:
        return self.request("DELETE", path, **kwargs)


def ndjson_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of an NDJSON stream (pull and push progress), skipping blank
    lines and any that are not an object: progress is advisory, the end event counts."""
    for line in lines:
        if not line.strip():
            continue
        try:
            event = jsonlib.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield event
