"""Store-like bundles and launches for the vLLM engine's unit tests (no vllm, no torch)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from dmr import testing
from dmr.records import AcceleratorInfo, Mode, RunnerLaunch

GiB = 1 << 30
CPU = AcceleratorInfo(
    name="cpu", kind="cpu", index=0, total_memory=16 * GiB, free_memory=12 * GiB, cores=2
)
GPU = AcceleratorInfo(
    name="NVIDIA H100", kind="cuda", index=0, total_memory=80 * GiB, free_memory=80 * GiB
)

LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}


def write_safetensors(path: Path, size: int) -> None:
    """A valid safetensors file of about `size` bytes (one uint8 tensor)."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * size)


def make_bundle(
    root: Path, config: dict[str, Any] | None = None, *, weights: int = 1000, template: bool = False
) -> Path:
    """`root/bundle` laid out as the store does: config.json + model/<original paths>."""
    bundle = root / "bundle"
    model = bundle / "model"
    model.mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({"format": "safetensors"}))
    (model / "config.json").write_text(json.dumps(config or LLAMA_CONFIG))
    write_safetensors(model / "model-00001-of-00002.safetensors", weights // 2)
    write_safetensors(model / "model-00002-of-00002.safetensors", weights - weights // 2)
    if template:
        (model / "template.jinja").write_text("{{ messages }}")
    return bundle


def make_launch(
    bundle: Path,
    *,
    mode: Mode = Mode.COMPLETION,
    device: AcceleratorInfo = CPU,
    socket: Path = Path("/tmp/dmr-vllm-test.sock"),
    model_config: dict[str, Any] | None = None,
    draft: Path | None = None,
    **config: Any,
) -> RunnerLaunch:
    return testing.make_launch(
        bundle,
        socket,
        mode=mode,
        model_name="ai/tiny",
        model_config=model_config or {"format": "safetensors"},
        device=device,
        draft_bundle_dir=draft,
        **config,
    )


def option(argv: tuple[str, ...] | list[str], name: str) -> str:
    """The value after `name` in `argv` (the last one if repeated)."""
    index = len(argv) - 1 - list(reversed(argv)).index(name)
    return argv[index + 1]
