"""`StoredModel`: one model in the store, as routes, the scheduler and engines see it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["VISION", "StoredModel", "parse_created"]

# The capability name Ollama's `/api/show` uses for image input; dmr uses it too.
VISION = "vision"

_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_created(value: object) -> int:
    """Unix seconds from an RFC 3339 time (Go writes nanoseconds; Python reads micro)."""
    if not isinstance(value, str) or not value:
        return 0
    text = _FRACTION.sub(r"\1", value.strip()).replace("Z", "+00:00").replace("z", "+00:00")
    try:
        created = datetime.fromisoformat(text)
    except ValueError:
        return 0
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return int(created.timestamp())


@dataclass(frozen=True)
class StoredModel:
    id: str  # "sha256:<manifest digest hex>"
    tags: tuple[str, ...]  # familiar names: "ai/smollm2:latest"
    files: tuple[str, ...]  # layer digests
    manifest: Mapping[str, Any]
    config: Mapping[str, Any]  # whole config blob ({"config":..., "descriptor":..., "rootfs":...})
    created: int  # unix seconds
    bundle_dir: Path  # bundles/sha256/<hex> (config.json + model/)

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("sha256:")[:12]

    @property
    def model_config(self) -> Mapping[str, Any]:
        """The "config" block: format, quantization, parameters, gguf, context_size."""
        block = self.config.get("config")
        return block if isinstance(block, Mapping) else {}

    @property
    def format(self) -> str:
        return str(self.model_config.get("format") or "")

    @property
    def name(self) -> str:
        """The first tag, or the short ID of an untagged model."""
        return self.tags[0] if self.tags else self.short_id

    @property
    def capabilities(self) -> tuple[str, ...]:
        """What the artifact itself shows the model takes beyond text: `vision` when it
        carries a projector. (Tools and thinking depend on the chat template; the
        Ollama dialect reads those from it.)"""
        return (VISION,) if self.mmproj_path() is not None else ()

    def api_json(self) -> dict[str, Any]:
        """One item of `GET /models` (DMR's shape, plus dmr's `capabilities`)."""
        return {
            "id": self.id,
            "tags": list(self.tags),
            "created": self.created,
            "config": dict(self.model_config),
            "capabilities": list(self.capabilities),
        }

    def model_path(self) -> Path:
        """What an engine loads: the GGUF (the FIRST shard of a sharded model; DMR's
        last-shard choice is a known defect), the DDUF file, else the model directory."""
        model_dir = self.bundle_dir / "model"
        single = model_dir / "model.gguf"
        if single.exists():
            return single
        shards = sorted(model_dir.glob("model-*-of-*.gguf"))
        if shards:
            return shards[0]
        dduf = model_dir / "model.dduf"
        if dduf.exists():
            return dduf
        return model_dir

    def mmproj_path(self) -> Path | None:
        """The vision projector, found as the llama.cpp engine finds it (its `bundle.py`):
        `model.mmproj` from an mmproj layer, or a file named *mmproj* beside the weights."""
        try:
            found = sorted(
                path
                for path in (self.bundle_dir / "model").iterdir()
                if "mmproj" in path.name.lower() and path.is_file()
            )
        except OSError:  # no model/ folder (a bare bundle)
            return None
        return found[0] if found else None

    def chat_template_path(self) -> Path | None:
        path = self.bundle_dir / "model" / "template.jinja"
        return path if path.exists() else None
