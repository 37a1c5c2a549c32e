"""Pull each model listed in DMR_MODELS_FILE into the dmr server at DMR_URL.

Runs in the dmr-prepull Job with the standard library only, so any Python image
does. For each reference it sends `POST /models/create` with `{"from": REF}` and
reads the server's NDJSON progress until a `success` or `error` line.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request

URL = os.environ.get("DMR_URL", "http://dmr:12434").rstrip("/")
MODELS_FILE = os.environ.get("DMR_MODELS_FILE", "/prepull/models.txt")
WAIT_SECONDS = float(os.environ.get("DMR_WAIT_SECONDS", "600"))


def _headers() -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    key = os.environ.get("DMR_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def post_json(path: str, body: object) -> urllib.request.Request:
    """A POST of `body` as JSON to the server's `path`, with the API key if one is set."""
    data = json.dumps(body).encode()
    return urllib.request.Request(URL + path, data=data, headers=_headers(), method="POST")


def print_refusal(subject: str, error: urllib.error.HTTPError) -> None:
    """The server's status and answer for a refused request about `subject`, on stderr."""
    detail = error.read().decode(errors="replace")
    print(f"{subject}: HTTP {error.code} {detail}", file=sys.stderr)


def wait_for_server() -> None:
    # The Job may start before the server's pod is ready.
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            with urllib.request.urlopen(URL + "/", timeout=5):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                raise SystemExit(f"dmr at {URL} did not answer: {error}") from None
            time.sleep(2)


def pull(reference: str) -> bool:
    request = post_json("/models/create", {"from": reference})
    try:
        with urllib.request.urlopen(request, timeout=None) as response:
            for raw in response:
                line = json.loads(raw)
                if line.get("type") == "error":
                    print(f"{reference}: {line.get('message')}", file=sys.stderr)
                    return False
                if line.get("type") == "success":
                    print(f"{reference}: {line.get('message')}", flush=True)
                    return True
    except urllib.error.HTTPError as error:
        print_refusal(reference, error)
        return False
    print(f"{reference}: the server closed the stream without success", file=sys.stderr)
    return False


def main() -> int:
    with open(MODELS_FILE, encoding="utf-8") as models:
        references = [
            line.strip() for line in models if line.strip() and not line.lstrip().startswith("#")
        ]
    wait_for_server()
    failed = [reference for reference in references if not pull(reference)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
