"""Facts about a Hugging Face safetensors model, read from its files without torch.

The server process sizes a vLLM runner before starting it, so everything here
comes from `config.json` and the safetensors headers, never from vllm or
transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelFacts", "find_model_dir", "read_model_facts"]

# Bytes per element of the `torch_dtype` / `dtype` names configs use.
DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


@dataclass(frozen=True)
class ModelFacts:
    """What the memory estimate and the command line need to know about a model."""

    model_dir: Path  # the folder holding config.json and the weights
    weight_bytes: int  # every *.safetensors file
    layers: int
    kv_heads: int
    head_dim: int
    max_positions: int | None  # max_position_embeddings (the trained context)
    dtype_bytes: int  # of the activations and, by default, the KV cache
    chat_template: Path | None  # template.jinja from `dmr package --chat-template`


def find_model_dir(bundle_dir: Path) -> Path:
    """The folder vLLM loads: the bundle's `model/` (or a subfolder with config.json)."""
    root = bundle_dir / "model" if (bundle_dir / "model").is_dir() else bundle_dir
    if (root / "config.json").is_file():
        return root
    # A safetensors directory packaged one level up (`org/model/config.json`).
    configs = sorted(root.rglob("config.json"), key=lambda path: len(path.parts))
    for config in configs:
        if any(config.parent.glob("*.safetensors")):
            return config.parent
    raise ValueError(f"no Hugging Face config.json beside safetensors weights in {root}")


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal configs keep the language model's shape in a nested block.
    nested = config.get("text_config")
    if isinstance(nested, dict) and nested.get("num_hidden_layers"):
        return {**config, **nested}
    return config


def _int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def read_model_facts(bundle_dir: Path) -> ModelFacts:
    """Shape and size of the model in `bundle_dir` (a store bundle or a plain HF folder)."""
    model_dir = find_model_dir(bundle_dir)
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"unreadable config.json in {model_dir}: {error}") from error
    if not isinstance(raw, dict):
        raise ValueError(f"config.json in {model_dir} is not a JSON object")
    config = _text_config(raw)
    layers = _int(config, "num_hidden_layers", "n_layer", "num_layers") or 1
    heads = _int(config, "num_attention_heads", "n_head") or 1
    kv_heads = _int(config, "num_key_value_heads", "multi_query_group_num") or heads
    hidden = _int(config, "hidden_size", "n_embd", "d_model") or 0
    head_dim = _int(config, "head_dim") or (hidden // heads if hidden else 128)
    dtype_name = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    template = bundle_dir / "model" / "template.jinja"
    return ModelFacts(
        model_dir=model_dir,
        weight_bytes=sum(path.stat().st_size for path in model_dir.rglob("*.safetensors")),
        layers=layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        max_positions=_int(config, "max_position_embeddings", "n_positions", "seq_length"),
        dtype_bytes=DTYPE_BYTES.get(dtype_name.removeprefix("torch."), 2),
        chat_template=template if template.is_file() else None,
    )
