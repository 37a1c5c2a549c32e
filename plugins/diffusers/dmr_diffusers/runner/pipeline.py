"""Loading the pipeline once and generating images: the only module touching torch.

Imported by the runner process only (never by `dmr serve`).
"""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from dmr_diffusers.runner.requests import OUTPUT_FORMATS, BadRequest, ImageRequest

__all__ = ["LoadedPipeline", "load_pipeline", "unpack_dduf"]


def unpack_dduf(archive: Path, work_dir: Path | None) -> Path:
    """Unpack a DDUF archive into a fresh folder and return it.

    diffusers 0.42 dropped `from_pretrained(..., dduf_file=...)`; a DDUF file is
    an uncompressed zip of the diffusers directory, so the folder loads the same.
    """
    target = Path(tempfile.mkdtemp(prefix="dduf-", dir=work_dir))
    try:
        with zipfile.ZipFile(archive) as bundle:
            for name in bundle.namelist():
                # zipfile sanitises names on extract; refuse rather than rewrite them.
                parts = name.split("/")
                if name.startswith("/") or ".." in parts or "\\" in name:
                    raise ValueError(f"unsafe path {name!r} in {archive.name}")
            bundle.extractall(target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    if not (target / "model_index.json").is_file():
        shutil.rmtree(target, ignore_errors=True)
        raise ValueError(f"{archive.name} is not a DDUF pipeline: it has no model_index.json")
    return target


def _dtype(device: str) -> torch.dtype:
    # Half precision halves GPU memory; bf16 where it exists, since fp16 VAEs can
    # overflow into black images. CPUs compute half precision slowly or not at all.
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


@dataclass
class LoadedPipeline:
    pipeline: Any  # a DiffusionPipeline subclass; typed loosely as diffusers is untyped
    device: str
    # torch's intra-op threads at load, and the count the next generation computes with:
    # fewer while other runners compute on the same cores (`share_threads`).
    loaded_threads: int = 1
    threads: int = 1

    def share_threads(self, busy_runners: int) -> int:
        """Compute with the loaded threads divided by `busy_runners`, the runners busy
        on these cores now (at least one), from the next generation on. torch's OpenMP
        threads spin at their barriers as llama.cpp's do (docs/scheduler.md)."""
        self.threads = max(1, self.loaded_threads // busy_runners)
        return self.threads

    @property
    def class_name(self) -> str:
        return type(self.pipeline).__name__

    def generate(self, request: ImageRequest) -> list[str]:
        """Base64-encoded images for `request` (blocking: call it from a thread)."""
        # A CPU generator gives the same image for a seed on any device.
        generator = torch.Generator("cpu")
        if request.seed is not None:
            generator.manual_seed(request.seed)
        else:
            generator.seed()
        options: dict[str, Any] = {
            "prompt": request.prompt,
            "num_images_per_prompt": request.n,
            "generator": generator,
            "output_type": "pil",
        }
        for name, value in (
            ("width", request.width),
            ("height", request.height),
            ("num_inference_steps", request.steps),
            ("negative_prompt", request.negative_prompt),
            ("guidance_scale", request.guidance_scale),
        ):
            if value is not None:
                options[name] = value
        if self.device == "cpu" and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                images = self.pipeline(**options).images
        except (ValueError, TypeError) as error:
            # The pipeline's own input checks (a size or option this model refuses).
            raise BadRequest(f"the pipeline refused the request: {error}") from error
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format=OUTPUT_FORMATS[request.output_format])
            encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return encoded


def load_pipeline(model: Path, device: str, work_dir: Path | None = None) -> LoadedPipeline:
    """Load a diffusers directory or DDUF archive onto `device`."""
    # Progress bars would fill the runner's log (which dmr keeps) with carriage returns.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    folder = unpack_dduf(model, work_dir) if model.is_file() else model
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            str(folder), dtype=_dtype(device), local_files_only=True
        )
    finally:
        if folder != model:
            # Weights are in memory now; the unpacked copy only costs disk.
            shutil.rmtree(folder, ignore_errors=True)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    threads = torch.get_num_threads()
    return LoadedPipeline(pipeline=pipeline, device=device, loaded_threads=threads, threads=threads)
