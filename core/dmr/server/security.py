"""API key and CORS checks, run around every request of the app.

The API key is optional (`DMR_API_KEY` / `DMR_API_KEY_FILE`); when set, every
route but `GET /`, the health route and the web UI's static page needs it, as
`Authorization: Bearer KEY` (OpenAI and Ollama clients) or `x-api-key: KEY`
(the Anthropic SDK).

CORS allows `DMR_ORIGINS` plus the loopback origins on any port. quart-cors
cannot express `http://host:*` port wildcards (DMR's own matcher gets them
wrong), so the matcher is written out here.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from quart import Quart, Response, jsonify, request

if TYPE_CHECKING:
    from dmr.settings import Settings

__all__ = ["LOCAL_ORIGINS", "OriginMatcher", "install_security"]

# Browsers on the same machine (web UIs, notebooks) may call the API from any port.
LOCAL_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*")
# Probes (Kubernetes, load balancers) cannot carry a secret header, so these stay open;
# so does the web UI's static page, which asks the user for the key and holds no data.
OPEN_ROUTES = frozenset({"/", "/engines/status", "/ui", "/ui/"})
OPEN_PREFIXES = ("/ui/static/",)
ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
DEFAULT_ALLOWED_HEADERS = "Authorization, Content-Type, X-Api-Key, X-Preload-Only"
PREFLIGHT_MAX_AGE = "600"


@dataclass(frozen=True)
class _OriginPattern:
    scheme: str
    host: str  # lower case; "*" alone matches every origin
    port: str | None  # None = the scheme's default port; "*" = any port

    @classmethod
    def parse(cls, text: str) -> _OriginPattern:
        text = text.strip().rstrip("/")
        if text == "*":
            return cls("*", "*", "*")
        scheme, _, rest = text.partition("://")
        host, port = _split_host_port(rest)
        return cls(scheme.lower(), host.lower(), port)

    def matches(self, scheme: str, host: str, port: str | None) -> bool:
        if self.host == "*":
            return True
        if (self.scheme, self.host) != (scheme, host):
            return False
        return self.port == "*" or self.port == port


def _split_host_port(netloc: str) -> tuple[str, str | None]:
    # "[::1]:8080" keeps its brackets so patterns and origins compare as written.
    if netloc.startswith("["):
        end = netloc.find("]")
        host, rest = netloc[: end + 1], netloc[end + 1 :]
        return host, rest[1:] if rest.startswith(":") else None
    host, sep, port = netloc.rpartition(":")
    return (host, port) if sep else (netloc, None)


class OriginMatcher:
    """Whether a request's `Origin` is allowed; patterns may end in `:*` for any port."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._patterns = tuple(_OriginPattern.parse(p) for p in patterns if p.strip())

    def allows(self, origin: str) -> bool:
        parts = urlsplit(origin)
        if not parts.scheme or not parts.netloc or parts.path not in ("", "/"):
            return False
        host, port = _split_host_port(parts.netloc.lower())
        return any(p.matches(parts.scheme.lower(), host, port) for p in self._patterns)


def _api_key_from_request() -> str | None:
    authorization = request.headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-Api-Key")


def _is_open(path: str) -> bool:
    # ".." never opens a protected route through an open prefix, whatever the router makes of it.
    return path in OPEN_ROUTES or (path.startswith(OPEN_PREFIXES) and ".." not in path)


def _unauthorized() -> Response:
    response = jsonify(
        {
            "error": {
                "message": "missing or invalid API key (send Authorization: Bearer KEY)",
                "type": "authentication_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    )
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Bearer realm="dmr"'
    return response


def install_security(app: Quart, settings: Settings) -> None:
    """Register the API-key and CORS hooks on the app."""
    origins = OriginMatcher((*LOCAL_ORIGINS, *settings.origins))
    expected_key = settings.api_key.encode() if settings.api_key else None

    @app.before_request
    async def check_request() -> Response | None:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin is not None:
            if request.headers.get("Access-Control-Request-Method") is None:
                return None  # a plain OPTIONS request, not a preflight
            # Preflights never carry credentials, so they are answered before the key check.
            if not origins.allows(origin):
                return Response("origin not allowed", status=403, mimetype="text/plain")
            return _preflight_response(origin)
        if expected_key is None:
            return None
        if request.method in ("GET", "HEAD") and _is_open(request.path):
            return None
        given = _api_key_from_request()
        # compare_digest takes the same time wherever the strings first differ.
        if given is None or not hmac.compare_digest(given.encode(), expected_key):
            return _unauthorized()
        return None

    @app.after_request
    async def add_cors_headers(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin is not None and origins.allows(origin):
            # No Allow-Credentials: dmr uses no cookies, and the key travels in a header.
            response.headers["Access-Control-Allow-Origin"] = origin
            response.vary.add("Origin")
        return response


def _preflight_response(origin: str) -> Response:
    response = Response("", status=204)
    requested_headers = request.headers.get("Access-Control-Request-Headers")
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
    # Echoing what the browser asks for lets SDKs add their own headers (x-stainless-*).
    response.headers["Access-Control-Allow-Headers"] = requested_headers or DEFAULT_ALLOWED_HEADERS
    response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
    response.vary.add("Origin")
    return response
