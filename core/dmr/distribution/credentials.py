"""Registry credentials the way the docker CLI finds them.

Order: a bearer token handed to the API, `DOCKER_USERNAME`/`DOCKER_PASSWORD`,
then `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`): a
per-registry `credHelpers` entry, inline `auths` (base64 `auth` or
`username`/`password`), then the global `credsStore`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DOCKER_HUB_AUTH_KEY",
    "RegistryCredentials",
    "docker_config_path",
    "resolve_credentials",
]

# The key `docker login` writes for Docker Hub.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS = frozenset({"index.docker.io", "docker.io", "registry-1.docker.io"})
_HELPER_TIMEOUT = 30.0


@dataclass(frozen=True)
class RegistryCredentials:
    """Either a username and password (basic, or exchanged for a token) or a bearer token."""

    username: str | None = None
    password: str | None = None
    bearer_token: str | None = None
    source: str = ""  # where they came from, for error messages

    @property
    def has_basic(self) -> bool:
        return bool(self.username) and self.password is not None

    def __repr__(self) -> str:  # never print secrets in logs
        return f"RegistryCredentials(username={self.username!r}, source={self.source!r})"


def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("DOCKER_CONFIG")
    return (Path(base) if base else Path.home() / ".docker") / "config.json"


def _auth_keys(host: str) -> Iterator[str]:
    """The keys a registry may be stored under in `auths` / `credHelpers`."""
    if host in _DOCKER_HUB_HOSTS:
        yield DOCKER_HUB_AUTH_KEY
        yield "index.docker.io"
        yield "docker.io"
    yield host
    yield f"https://{host}"
    yield f"http://{host}"
    yield f"https://{host}/v1/"
    yield f"https://{host}/v2/"


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _from_helper(helper: str, key: str) -> RegistryCredentials | None:
    """Ask `docker-credential-<helper> get`; a missing helper or entry is not an error."""
    try:
        done = subprocess.run(
            [f"docker-credential-{helper}", "get"],
            input=key.encode(),
            capture_output=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        payload = json.loads(done.stdout)
    except ValueError:
        return None
    username, secret = payload.get("Username"), payload.get("Secret")
    if not isinstance(secret, str) or not secret:
        return None
    source = f"docker-credential-{helper}"
    if username == "<token>":  # an identity token, not a password
        return RegistryCredentials(bearer_token=secret, source=source)
    return RegistryCredentials(username=str(username or ""), password=secret, source=source)


def _from_auth_entry(entry: Mapping[str, Any], source: str) -> RegistryCredentials | None:
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=False).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, sep, password = decoded.partition(":")
        if sep:
            return RegistryCredentials(username=username, password=password, source=source)
    user, secret = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(secret, str) and user:
        return RegistryCredentials(username=user, password=secret, source=source)
    token = entry.get("registrytoken")
    if isinstance(token, str) and token:
        return RegistryCredentials(bearer_token=token, source=source)
    return None


def resolve_credentials(
    host: str,
    *,
    bearer_token: str | None = None,
    env: Mapping[str, str] | None = None,
) -> RegistryCredentials | None:
    """Credentials for `host` (e.g. `localhost:5000`, `index.docker.io`), or None."""
    env = os.environ if env is None else env
    if bearer_token:
        return RegistryCredentials(bearer_token=bearer_token, source="bearer token")
    username, password = env.get("DOCKER_USERNAME"), env.get("DOCKER_PASSWORD")
    if username and password is not None:
        return RegistryCredentials(
            username=username, password=password, source="DOCKER_USERNAME/DOCKER_PASSWORD"
        )
    path = docker_config_path(env)
    config = _read_config(path)
    keys = list(dict.fromkeys(_auth_keys(host)))
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key in keys:
            helper = helpers.get(key)
            if isinstance(helper, str) and helper:
                found = _from_helper(helper, key)
                if found:
                    return found
    auths = config.get("auths")
    if isinstance(auths, dict):
        for key in keys:
            entry = auths.get(key)
            if isinstance(entry, dict):
                found = _from_auth_entry(entry, str(path))
                if found:
                    return found
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        for key in keys:
            found = _from_helper(store, key)
            if found:
                return found
    return None
