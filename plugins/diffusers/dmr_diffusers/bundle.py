"""Finding a diffusers pipeline inside a store bundle (`bundle_dir/model/...`).

Two layouts: one `model.dduf` archive (a DDUF layer), or a diffusers directory
(`model_index.json` beside one folder per component, from a v0.2 artifact whose
layers keep their relative paths). Runs in `dmr serve`: no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["WEIGHT_SUFFIXES", "DiffusersBundle", "find_diffusers_bundle"]

# Files whose bytes end up in memory; configs and tokenizers are noise beside them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


@dataclass(frozen=True)
class DiffusersBundle:
    path: Path  # the .dduf file, or the directory holding model_index.json
    is_dduf: bool

    @property
    def weight_bytes(self) -> int:
        if self.is_dduf:
            return self.path.stat().st_size
        return sum(
            file.stat().st_size
            for file in self.path.rglob("*")
            if file.is_file() and file.name.endswith(WEIGHT_SUFFIXES)
        )


def find_diffusers_bundle(bundle_dir: Path) -> DiffusersBundle:
    """The pipeline in a bundle; also accepts a bare `.dduf` file or diffusers directory."""
    if bundle_dir.is_file():
        if bundle_dir.suffix != ".dduf":
            raise ValueError(f"{bundle_dir} is not a DDUF file")
        return DiffusersBundle(bundle_dir, is_dduf=True)
    folder = bundle_dir / "model" if (bundle_dir / "model").is_dir() else bundle_dir
    if (folder / "model_index.json").is_file():
        return DiffusersBundle(folder, is_dduf=False)
    archives = sorted(folder.glob("*.dduf"))
    if archives:
        preferred = folder / "model.dduf"
        return DiffusersBundle(preferred if preferred in archives else archives[0], is_dduf=True)
    raise ValueError(f"no diffusers pipeline (model_index.json or .dduf) in {folder}")
