"""The named-context file, read by every command to pick its server (dmr.cli.autostart),
so this module is kept light; `dmr context` (dmr.cli.contexts) changes it.
The file and its shape are Docker Model Runner's: see dmr.cli.contexts.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CONTEXT_FILE_VERSION",
    "DEFAULT_CONTEXT",
    "VALID_CONTEXT_NAME",
    "ActiveContext",
    "ContextFileError",
    "active_context",
    "contexts_file",
    "docker_config_dir",
    "read_contexts",
]

DEFAULT_CONTEXT = "default"
CONTEXT_FILE_VERSION = 1
# modelctx.validContextName
VALID_CONTEXT_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


class ContextFileError(Exception):
    """The contexts file exists but cannot be read or parsed."""


def docker_config_dir() -> Path:
    """`$DOCKER_CONFIG`, else `~/.docker`, as the docker CLI resolves it."""
    configured = os.environ.get("DOCKER_CONFIG")
    return Path(configured).expanduser() if configured else Path.home() / ".docker"


def contexts_file() -> Path:
    return docker_config_dir() / "model" / "contexts.json"


@dataclass(frozen=True)
class ActiveContext:
    """The server a named context points at."""

    name: str
    host: str
    tls: bool
    skip_verify: bool
    ca_cert: str


def read_contexts(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"version": CONTEXT_FILE_VERSION, "contexts": {}}
    except (OSError, ValueError) as error:
        raise ContextFileError(f"unable to read {path}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("contexts", {}), dict):
        raise ContextFileError(f"unable to parse {path}: not a contexts file")
    data.setdefault("contexts", {})
    return data


def active_context() -> ActiveContext | None:
    """The context `dmr context use` chose, or None for `default` (one stat when unset)."""
    path = contexts_file()
    if not path.exists():
        return None
    data = read_contexts(path)
    name = data.get("current") or ""
    entry = data["contexts"].get(name) if name else None
    if not isinstance(entry, dict) or not isinstance(entry.get("host"), str):
        return None
    found = entry.get("tls")
    tls: dict[str, Any] = found if isinstance(found, dict) else {}
    return ActiveContext(
        name=name,
        host=entry["host"],
        tls=bool(tls.get("enabled")),
        skip_verify=bool(tls.get("skipVerify")),
        ca_cert=str(tls.get("caCert") or ""),
    )
