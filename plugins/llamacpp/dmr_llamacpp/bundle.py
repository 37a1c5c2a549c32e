"""Finding the files of a GGUF model inside a store bundle (`bundle_dir/model/...`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GgufBundle", "find_gguf_bundle"]

_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class GgufBundle:
    model: Path  # model.gguf, or the first shard of a split model
    shards: tuple[Path, ...]  # every weight file (one unless split)
    chat_template: Path | None
    mmproj: Path | None

    @property
    def weight_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.shards)


def _is_mmproj(path: Path) -> bool:
    return "mmproj" in path.name.lower()


def find_gguf_bundle(bundle_dir: Path) -> GgufBundle:
    """The weights, chat template and projector in a bundle (or a bare `.gguf` path)."""
    if bundle_dir.is_file():
        return GgufBundle(bundle_dir, (bundle_dir,), None, None)
    folder = bundle_dir / "model" if (bundle_dir / "model").is_dir() else bundle_dir
    files = sorted(path for path in folder.iterdir() if path.is_file())
    weights = [path for path in files if path.suffix == ".gguf" and not _is_mmproj(path)]
    if not weights:
        raise ValueError(f"no GGUF weights in {folder}")
    preferred = folder / "model.gguf"
    shards: tuple[Path, ...]
    if preferred in weights:
        model, shards = preferred, (preferred,)
    else:
        split = [path for path in weights if _SHARD.search(path.name)]
        if split:
            shards = tuple(sorted(split))
            model = shards[0]
        else:
            model, shards = weights[0], (weights[0],)
    templates = [path for path in files if path.suffix == ".jinja"]
    template = folder / "template.jinja" if (folder / "template.jinja").exists() else None
    projector = [path for path in files if _is_mmproj(path)]
    return GgufBundle(
        model=model,
        shards=shards,
        chat_template=template or (templates[0] if templates else None),
        mmproj=projector[0] if projector else None,
    )
