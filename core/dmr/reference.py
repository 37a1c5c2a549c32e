"""Model reference normalisation exactly as Docker Model Runner does it.

The rules: docs/compatibility.md §1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_TAG",
    "HUGGINGFACE_REGISTRY",
    "InvalidReferenceError",
    "ModelReference",
    "display_name",
    "is_model_id",
    "normalize_model_id",
    "parse_reference",
]

DEFAULT_NAMESPACE = "ai"
DEFAULT_TAG = "latest"
DOCKER_HUB = "index.docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
HUGGINGFACE_REGISTRY = "huggingface.co"
HUGGINGFACE_ALIASES = frozenset({"hf.co", "huggingface.co"})

# The OCI distribution grammar, kept strict so no name can smuggle "..", "/" runs
# or shell/URL metacharacters into a path or a request.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9-]+)*(?::\d{1,5})?$"
)
_HEX64 = re.compile(r"^[a-f0-9]{64}$")
_HEX12 = re.compile(r"^[a-f0-9]{12}$")


class InvalidReferenceError(ValueError):
    """A model name that is not a valid reference."""


def is_model_id(text: str) -> bool:
    """`sha256:<64hex>`, 64 hex or a 12-hex short ID."""
    text = text.strip().lower()
    return bool(_DIGEST.match(text) or _HEX64.match(text) or _HEX12.match(text))


def normalize_model_id(text: str) -> str:
    """`sha256:<hex>` for a full ID; a short ID stays bare hex (the store resolves it)."""
    text = text.strip().lower()
    if _HEX64.match(text):
        return "sha256:" + text
    return text


def _default_registry() -> str:
    return os.environ.get("DEFAULT_REGISTRY") or DOCKER_HUB


@dataclass(frozen=True)
class ModelReference:
    registry: str  # "index.docker.io", "localhost:5000", "huggingface.co"
    repository: str  # "ai/smollm2"
    tag: str = DEFAULT_TAG
    digest: str | None = None

    @property
    def is_huggingface(self) -> bool:
        return self.registry == HUGGINGFACE_REGISTRY

    @property
    def is_default_registry(self) -> bool:
        default = _default_registry()
        return self.registry == default or (
            self.registry in DOCKER_HUB_ALIASES and default in DOCKER_HUB_ALIASES
        )

    @property
    def familiar(self) -> str:
        """The name DMR shows and stores as a tag: `ai/smollm2:latest`,
        `localhost:5000/org/m:v1`, `huggingface.co/org/repo:Q4_K_M`."""
        name = self.repository if self.is_default_registry else f"{self.registry}/{self.repository}"
        if self.digest:
            return f"{name}@{self.digest}"
        return f"{name}:{self.tag}"

    @property
    def full(self) -> str:
        base = f"{self.registry}/{self.repository}"
        return f"{base}@{self.digest}" if self.digest else f"{base}:{self.tag}"

    def __str__(self) -> str:
        return self.familiar


def _split_registry(name: str) -> tuple[str | None, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, name


def parse_reference(text: str) -> ModelReference:
    """Normalise a user-supplied model name.

    `smollm2` → `ai/smollm2:latest`; `hf.co/org/Repo:q4` → `huggingface.co/org/repo:q4`;
    only the repository part is lower-cased.
    """
    raw = text.strip()
    if not raw or len(raw) > 512 or any(c.isspace() for c in raw) or "\\" in raw:
        raise InvalidReferenceError(f"invalid reference {text!r}")
    name, digest = raw, None
    if "@" in raw:
        name, _, digest = raw.partition("@")
        if not _DIGEST.match(digest):
            raise InvalidReferenceError(f"invalid digest in reference {text!r}")
    registry, remainder = _split_registry(name)
    tag = DEFAULT_TAG
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidReferenceError(f"invalid tag {tag!r} in reference {text!r}")
    repository = remainder.lower()
    if registry is None:
        registry = _default_registry()
        if "/" not in repository:
            repository = f"{DEFAULT_NAMESPACE}/{repository}"
    elif registry.lower() in HUGGINGFACE_ALIASES:
        registry = HUGGINGFACE_REGISTRY
    elif registry.lower() in DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"{DEFAULT_NAMESPACE}/{repository}"
    if not _HOST.match(registry):
        raise InvalidReferenceError(f"invalid registry {registry!r} in reference {text!r}")
    if not _REPOSITORY.match(repository) or len(repository) > 255:
        raise InvalidReferenceError(
            f"invalid repository {repository!r} in reference {text!r}: use lower-case letters, "
            "digits and . _ - separated by /"
        )
    return ModelReference(registry=registry, repository=repository, tag=tag, digest=digest)


def display_name(text: str) -> str:
    """One stable name per model for labels and listings, whatever spelling a client
    used: `smollm2`, `ai/smollm2:latest` and `ai/smollm2` all give `ai/smollm2`.
    IDs and names that do not parse are returned as given."""
    if is_model_id(text):
        return text
    try:
        familiar = parse_reference(text).familiar
    except InvalidReferenceError:
        return text
    return familiar.removesuffix(f":{DEFAULT_TAG}")
