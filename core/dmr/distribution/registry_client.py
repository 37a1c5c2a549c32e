"""A registry client on oras's `Registry`: its session, auth backend and URL helpers.

oras's high-level `pull`/`push` do not fit model artifacts: they write files by
title annotation, re-serialise manifests (changing their digest), read whole
blobs into memory on upload and retry every error with sleeps of up to 80 s.
So this class keeps oras's plumbing (requests session with proxy support,
`Container` URLs, token exchange, upload session locations) and replaces
`do_request` with bounded retries, basic *and* bearer challenges, and adds
streamed, resumable blob transfers.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import oras.auth.utils
import oras.container
import oras.provider
import oras.utils
import requests

from dmr.distribution.progress import TransferCancelledError
from dmr.errors import ModelNotFoundError, RegistryError
from dmr.media_types import MANIFEST_MAX_BYTES
from dmr.store import splice

if TYPE_CHECKING:
    from dmr.distribution.credentials import RegistryCredentials

__all__ = [
    "CHUNK_SIZE",
    "MANIFEST_MAX_BYTES",
    "BlobSink",
    "RegistryAuthError",
    "RegistryClient",
    "TransferCancelledError",
]

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
ATTEMPTS = 4
# A body cut off mid-way: requests raises ChunkedEncodingError for a short
# Content-Length body (IncompleteRead), not ConnectionError; both are worth a resume.
_BODY_BROKEN = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# (connect, read) seconds; a stalled registry fails and is retried rather than hangs.
TIMEOUT = (10.0, 60.0)
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)


class RegistryAuthError(RegistryError):
    """The registry wants credentials we do not have, or refused the ones we sent."""

    status = 401
    code = "unauthorized"
    error_type = "authentication_error"


class BlobSink(Protocol):
    """What the store's `blob_writer` gives us (docs/architecture.md)."""

    offset: int

    def write(self, data: bytes) -> Any: ...
    def receive_socket(self, socket_fd: int, count: int, timeout: float) -> int: ...
    def commit(self) -> Any: ...


def _first_line(error: BaseException) -> str:
    # requests wraps urllib3's errors in tuples: keep the first readable part.
    text = str(error.args[0]) if error.args else str(error)
    return text.splitlines()[0][:200] if text else repr(error)


def _plain_body(response: requests.Response) -> http.client.HTTPResponse | None:
    """The `http.client` response under a body whose bytes on the socket are the
    blob's own: plain HTTP (not TLS), no Content-Encoding, a Content-Length, not
    chunked. urllib3 keeps it as `_fp`; None where any of that does not hold."""
    if not response.url.lower().startswith("http://"):
        return None
    if response.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        return None
    body = getattr(response.raw, "_fp", None)
    if not isinstance(body, http.client.HTTPResponse) or body.chunked or body.length is None:
        return None
    return body


def _backoff(attempt: int) -> float:
    return float(min(8.0, 0.5 * 2**attempt) + random.uniform(0, 0.25))


class _ProgressReader:
    """A sized file body for requests that reports bytes as they are sent."""

    def __init__(
        self, handle: IO[bytes], size: int, on_bytes: Callable[[int], None], stop: threading.Event
    ) -> None:
        self._handle = handle
        self._size = size
        self._sent = 0
        self._on_bytes = on_bytes
        self._stop = stop

    def __len__(self) -> int:  # requests sets Content-Length from this
        return self._size

    def read(self, amount: int = -1) -> bytes:
        if self._stop.is_set():
            raise TransferCancelledError("push cancelled")
        data = self._handle.read(CHUNK_SIZE if amount is None or amount < 0 else amount)
        self._sent += len(data)
        self._on_bytes(self._sent)
        return data


class RegistryClient(oras.provider.Registry):  # type: ignore[misc]
    """One registry host, one set of credentials, one repository at a time."""

    def __init__(
        self,
        host: str,
        *,
        scheme: str = "https",
        credentials: RegistryCredentials | None = None,
        stop: threading.Event | None = None,
        http_fallback: bool = False,
    ) -> None:
        super().__init__(hostname=host, insecure=scheme == "http", auth_backend="token")
        self.host = host
        # INSECURE_REGISTRY: try TLS first and fall back to plain HTTP (as containerd does).
        self.http_fallback = http_fallback and scheme == "https"
        self.credentials = credentials
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._authorization: str | None = None
        if credentials and credentials.bearer_token:
            self._authorization = f"Bearer {credentials.bearer_token}"

    # ------------------------------------------------------------------ requests

    def container(self, repository: str, reference: str = "latest") -> oras.container.Container:
        separator = "@" if reference.startswith("sha256:") else ":"
        return oras.container.Container(
            f"{self.host}/{repository}{separator}{reference}", registry=self.host
        )

    def url(self, path: str) -> str:
        return f"{self.prefix}://{path}"

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise TransferCancelledError("transfer cancelled")

    def do_request(
        self,
        url: str,
        method: str = "GET",
        data: Any = None,
        headers: dict[str, str] | None = None,
        json: Any = None,
        stream: bool = False,
    ) -> requests.Response:
        """One request with auth challenges answered and transient failures retried."""
        replayable = data is None or isinstance(data, bytes | str)
        attempt = 0
        authenticated_after_401 = False
        while True:
            self._check_stop()
            sent = dict(headers or {})
            with self._lock:
                if self._authorization:
                    sent["Authorization"] = self._authorization
            try:
                response: requests.Response = self.session.request(
                    method,
                    url,
                    data=data,
                    json=json,
                    headers=sent,
                    stream=stream,
                    timeout=TIMEOUT,
                    verify=self._tls_verify,
                )
            except (requests.ConnectionError, requests.Timeout) as error:
                if self.http_fallback and url.startswith("https://"):
                    log.info("registry %s: no TLS (%s); using plain HTTP", self.host, error)
                    self.http_fallback = False
                    self.prefix = self.auth.prefix = "http"
                    url = "http://" + url.removeprefix("https://")
                    continue
                attempt += 1
                if attempt >= ATTEMPTS or not replayable:
                    raise RegistryError(f"cannot reach registry {self.host}: {error}") from error
                log.info("registry %s unreachable (%s); retrying", self.host, error)
                time.sleep(_backoff(attempt))
                continue
            if response.status_code == 401:
                response.close()
                if authenticated_after_401 or not replayable:
                    raise RegistryAuthError(self._refused_message())
                self._authenticate(response)
                authenticated_after_401 = True
                continue
            if replayable and response.status_code in RETRY_STATUSES:
                attempt += 1
                if attempt < ATTEMPTS:
                    response.close()
                    time.sleep(_backoff(attempt))
                    continue
            return response

    def _refused_message(self) -> str:
        if self.credentials is None:
            return (
                f"authentication required by registry {self.host}: run `docker login {self.host}` "
                "or set DOCKER_USERNAME and DOCKER_PASSWORD"
            )
        return (
            f"registry {self.host} refused the credentials from {self.credentials.source} "
            "(wrong username, password or token?)"
        )

    def _authenticate(self, challenge_response: requests.Response) -> None:
        """Answer a `WWW-Authenticate` challenge: Basic directly, Bearer via the token realm."""
        challenge = challenge_response.headers.get("WWW-Authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        creds = self.credentials
        if creds and creds.bearer_token and not creds.has_basic:
            # A token handed to us is all we have; it was already sent and refused.
            raise RegistryAuthError(self._refused_message())
        if scheme == "basic":
            if not (creds and creds.has_basic):
                raise RegistryAuthError(self._refused_message())
            basic = oras.auth.utils.get_basic_auth(creds.username, creds.password)
            with self._lock:
                self._authorization = f"Basic {basic}"
            return
        if scheme == "bearer":
            parsed = oras.auth.utils.parse_auth_header(challenge)
            if creds and creds.has_basic:
                self.auth.set_basic_auth(creds.username, creds.password)
                token = self.auth.request_token(parsed)
            else:
                token = self.auth.request_anonymous_token(parsed)
            if not token:
                raise RegistryAuthError(self._refused_message())
            with self._lock:
                self._authorization = f"Bearer {token}"
            return
        raise RegistryAuthError(f"registry {self.host} asks for unsupported auth {challenge!r}")

    # ------------------------------------------------------------------ pull

    def fetch_manifest(self, repository: str, reference: str) -> tuple[bytes, str]:
        """The manifest's exact bytes (its digest is the model ID) and its digest."""
        container = self.container(repository, reference)
        response = self.do_request(
            self.url(container.manifest_url()),
            "GET",
            headers={"Accept": MANIFEST_ACCEPT},
            stream=True,
        )
        with response:
            if response.status_code == 404:
                raise ModelNotFoundError(
                    f"model {repository}:{reference} not found in registry {self.host}"
                )
            if response.status_code != 200:
                raise RegistryError(
                    f"registry {self.host} answered {response.status_code} for manifest "
                    f"{repository}:{reference}: {_registry_message(response)}"
                )
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > MANIFEST_MAX_BYTES:
                raise RegistryError(f"manifest of {repository}:{reference} is too large")
            body = _read_capped(response, MANIFEST_MAX_BYTES, "manifest")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        expected = reference if reference.startswith("sha256:") else None
        expected = expected or response.headers.get("Docker-Content-Digest")
        if expected and expected.startswith("sha256:") and expected != digest:
            raise RegistryError(
                f"manifest of {repository}:{reference} does not match its digest {expected}"
            )
        return body, digest

    def fetch_small_blob(self, repository: str, digest: str, size: int) -> bytes:
        """A config blob, read into memory and verified."""
        container = self.container(repository)
        response = self.do_request(self.url(container.get_blob_url(digest)), "GET", stream=True)
        with response:
            if response.status_code != 200:
                raise RegistryError(
                    f"registry {self.host} answered {response.status_code} for blob {digest}"
                )
            body = _read_capped(response, size, "config blob")
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise RegistryError(f"blob {digest} from {self.host} does not match its digest")
        return body

    def download_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        sink: BlobSink,
        on_bytes: Callable[[int], None],
    ) -> None:
        """Stream a blob into `sink`, resuming with `Range` from what it already holds."""
        container = self.container(repository)
        url = self.url(container.get_blob_url(digest))
        offset = sink.offset
        failures = 0
        on_bytes(offset)
        while offset < size:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            response = self.do_request(url, "GET", headers=headers, stream=True)
            with response:
                skip = 0
                if response.status_code == 206:
                    content_range = response.headers.get("Content-Range", "")
                    if not content_range.startswith(f"bytes {offset}-"):
                        raise RegistryError(
                            f"registry {self.host} sent range {content_range!r} for {digest}"
                        )
                elif response.status_code == 200:
                    skip = offset  # the registry ignored Range: drop what we already have
                elif response.status_code == 404:
                    raise RegistryError(f"blob {digest} is missing from registry {self.host}")
                else:
                    raise RegistryError(
                        f"registry {self.host} answered {response.status_code} for blob {digest}"
                    )
                try:
                    if skip or not self._splice_body(response, sink, digest, size, on_bytes):
                        self._stream_body(response, skip, sink, digest, size, on_bytes)
                except _BODY_BROKEN as error:
                    offset = sink.offset  # what came before the break stays
                    failures += 1
                    if failures >= ATTEMPTS:
                        raise RegistryError(
                            f"download of {digest} from {self.host} kept failing "
                            f"({failures} attempts, {offset} of {size} bytes kept for a "
                            f"resume): {type(error).__name__}: {_first_line(error)}"
                        ) from error
                    time.sleep(_backoff(failures))
                    continue
            offset = sink.offset
            if offset < size:
                failures += 1
                if failures >= ATTEMPTS:
                    raise RegistryError(f"download of {digest} from {self.host} ended early")
        sink.commit()

    def _stream_body(
        self,
        response: requests.Response,
        skip: int,
        sink: BlobSink,
        digest: str,
        size: int,
        on_bytes: Callable[[int], None],
    ) -> None:
        """Hand the body to `sink` chunk by chunk, dropping its first `skip` bytes."""
        for chunk in response.iter_content(CHUNK_SIZE):
            self._check_stop()
            if skip:
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
                if not chunk:
                    continue
            if sink.offset + len(chunk) > size:
                raise RegistryError(f"blob {digest} from {self.host} is larger than its descriptor")
            sink.write(chunk)
            on_bytes(sink.offset)

    def _splice_body(
        self,
        response: requests.Response,
        sink: BlobSink,
        digest: str,
        size: int,
        on_bytes: Callable[[int], None],
    ) -> bool:
        """Let the kernel move the body from the socket into the blob's file (`splice`),
        where it is the blob's bytes as sent; False, having read nothing, where not."""
        body = _plain_body(response)
        if body is None or not splice.available():
            return False
        assert body.length is not None
        if sink.offset + body.length > size:
            raise RegistryError(f"blob {digest} from {self.host} is larger than its descriptor")
        try:
            # What http.client read past the headers: after it, nothing sits above the socket.
            head = body.read1(min(body.length, 1 << 16))
        except (OSError, http.client.HTTPException) as error:
            raise requests.ConnectionError(f"{type(error).__name__}: {error}") from error
        if body.length and not head:
            raise requests.ConnectionError("the connection closed before the body")
        sink.write(head)
        on_bytes(sink.offset)
        remaining = body.length  # read1 counted the head off
        if not remaining:
            return True
        socket_fd = body.fileno()
        try:
            while remaining:
                self._check_stop()
                moved = sink.receive_socket(
                    socket_fd, min(splice.SPLICE_STEP, remaining), TIMEOUT[1]
                )
                if not moved:
                    raise requests.ConnectionError(
                        f"the connection closed {remaining} bytes before the end of the body"
                    )
                remaining -= moved
                on_bytes(sink.offset)
        except (ConnectionError, TimeoutError) as error:
            raise requests.ConnectionError(f"{type(error).__name__}: {error}") from error
        except splice.UnsupportedError as error:
            if remaining != body.length:
                # Bytes went past http.client: only a new request (with Range) goes on.
                raise requests.ConnectionError(str(error)) from error
            self._read_rest(body, sink, on_bytes)
        return True

    def _read_rest(
        self, body: http.client.HTTPResponse, sink: BlobSink, on_bytes: Callable[[int], None]
    ) -> None:
        """The rest of a body read through `http.client`, whose count of it is right
        (urllib3's is not, once `read1` took the head behind its back)."""
        while True:
            try:
                chunk = body.read(CHUNK_SIZE)
            except (OSError, http.client.HTTPException) as error:
                raise requests.ConnectionError(f"{type(error).__name__}: {error}") from error
            if not chunk:
                return
            self._check_stop()
            sink.write(chunk)
            on_bytes(sink.offset)

    # ------------------------------------------------------------------ push

    def has_blob(self, repository: str, digest: str) -> bool:
        container = self.container(repository)
        response = self.do_request(self.url(container.get_blob_url(digest)), "HEAD")
        response.close()
        return response.status_code == 200

    def upload_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        path: Path,
        on_bytes: Callable[[int], None],
    ) -> None:
        """Monolithic upload (POST a session, PUT the bytes), retried from scratch."""
        container = self.container(repository)
        for attempt in range(ATTEMPTS):
            self._check_stop()
            start = self.do_request(
                self.url(container.upload_blob_url()), "POST", headers={"Content-Length": "0"}
            )
            start.close()
            if start.status_code != 202:
                raise RegistryError(
                    f"registry {self.host} refused an upload to {repository}: "
                    f"{start.status_code} {_registry_message(start)}"
                )
            location = self._get_location(start, container)
            target = oras.utils.append_url_params(location, {"digest": digest})
            try:
                with path.open("rb") as handle:
                    body = _ProgressReader(handle, size, on_bytes, self.stop)
                    done = self.do_request(
                        target,
                        "PUT",
                        data=body,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Length": str(size),
                        },
                    )
            except RegistryAuthError:
                raise
            except RegistryError:
                if attempt + 1 >= ATTEMPTS or self.stop.is_set():
                    raise
                time.sleep(_backoff(attempt + 1))
                continue
            done.close()
            if done.status_code == 201:
                return
            if done.status_code not in RETRY_STATUSES or attempt + 1 >= ATTEMPTS:
                raise RegistryError(
                    f"registry {self.host} refused blob {digest}: "
                    f"{done.status_code} {_registry_message(done)}"
                )
            time.sleep(_backoff(attempt + 1))

    def put_manifest(self, repository: str, tag: str, body: bytes, media_type: str) -> None:
        container = self.container(repository, tag)
        response = self.do_request(
            self.url(container.manifest_url()),
            "PUT",
            data=body,
            headers={"Content-Type": media_type},
        )
        response.close()
        if response.status_code not in (200, 201):
            raise RegistryError(
                f"registry {self.host} refused the manifest for {repository}:{tag}: "
                f"{response.status_code} {_registry_message(response)}"
            )


def _read_capped(response: requests.Response, cap: int, what: str) -> bytes:
    parts: list[bytes] = []
    total = 0
    for chunk in response.iter_content(64 * 1024):
        total += len(chunk)
        if total > cap:
            raise RegistryError(f"{what} is larger than {cap} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _registry_message(response: requests.Response) -> str:
    """The registry's own error text (`{"errors":[{"message":...}]}`) when it sent one."""
    try:
        errors = response.json().get("errors") or []
        return "; ".join(str(e.get("message", e)) for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError, requests.RequestException):
        return response.reason or ""
