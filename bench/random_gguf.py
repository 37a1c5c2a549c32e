"""Bench models with random weights, written with llama.cpp's `gguf` writer.

    python bench/random_gguf.py vocab SOURCE.gguf VOCAB.json
    python bench/random_gguf.py write VOCAB.json OUT.gguf [--embedding 2048 --layers 16
           --heads 32 --kv-heads 8 --ffn 8192 --context 4096 --weights q4_k]

`vocab` keeps a real GGUF's metadata (tokenizer, chat template, hyperparameters:
about 2 MB for SmolLM2) and none of its weights. `write` makes a llama-architecture
GGUF with that metadata and random quantized weights, the hyperparameters taken
from the source unless given. Speed depends on the shapes and the quantization, not
on the weights' values, so a machine that cannot fetch a model (the offline GPU
machine `scripts/gpu-check` runs on) benchmarks one of any size from a small file.

The weights are random bytes in the quantized blocks, with each block's scale set
so the values stay near ±0.03: nothing is quantized, so a 1B model takes seconds.
The output embedding (tied to the input one) has zero rows for the control tokens,
so greedy decoding never picks end-of-turn and every answer runs to `max_tokens`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

__all__ = ["read_vocab", "write_model"]

CONTROL_TOKEN = 3  # tokenizer.ggml.token_type for <|im_end|> and the like

# Which quantization each tensor kind gets, per `--weights` choice.
WEIGHT_TYPES = {
    "q4_1": GGMLQuantizationType.Q4_1,  # SmolLM2's own (ai/smollm2 is Q4_1)
    "q4_k": GGMLQuantizationType.Q4_K,  # what most ai/ models ship (Q4_K_M)
    "q8_0": GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {"q4_1": 3, "q4_k": 15, "q8_0": 7}  # llama_ftype: MOSTLY_Q4_1, Q4_K_M, Q8_0


def read_vocab(source: Path) -> dict[str, Any]:
    """Every metadata field of a GGUF (name -> type and value), no tensors."""
    reader = GGUFReader(source)
    fields: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        types = [int(kind) for kind in field.types]
        fields[name] = {"types": types, "value": field.contents()}
    return fields


def _scale_bytes(value: float) -> np.ndarray:
    return np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)


def random_blocks(
    rows: int, columns: int, kind: GGMLQuantizationType, rng: np.random.Generator
) -> np.ndarray:
    """A (rows, bytes per row) uint8 array of quantized blocks with random quants and
    fixed small scales, laid out as ggml reads each type."""
    block, size = {
        GGMLQuantizationType.Q4_1: (32, 20),
        GGMLQuantizationType.Q4_K: (256, 144),
        GGMLQuantizationType.Q8_0: (32, 34),
    }[kind]
    if columns % block:
        raise ValueError(f"{columns} columns is not a multiple of {kind.name}'s block of {block}")
    blocks = rows * (columns // block)
    data = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    if kind == GGMLQuantizationType.Q4_1:  # w = d*q + m, q in 0..15
        data[:, 0:2] = _scale_bytes(0.004)
        data[:, 2:4] = _scale_bytes(-0.03)
    elif kind == GGMLQuantizationType.Q8_0:  # w = d*q, q in -128..127
        data[:, 0:2] = _scale_bytes(0.0002)
    else:  # Q4_K: w = d*scale*q - dmin*min, 6-bit scales and mins, q in 0..15
        data[:, 0:2] = _scale_bytes(2.5e-5)
        data[:, 2:4] = _scale_bytes(2.5e-5)
    return data.reshape(rows, -1)


def _hyper(fields: dict[str, Any], key: str) -> int:
    return int(fields[f"llama.{key}"]["value"])


def write_model(
    vocab: dict[str, Any],
    target: Path,
    *,
    weights: str,
    overrides: dict[str, int],
    name: str,
    seed: int = 0,
) -> Path:
    """Write a llama-architecture GGUF with `vocab`'s metadata, `overrides` applied to
    the hyperparameters, and random weights of type `weights` (q4_1, q4_k, q8_0)."""
    fields = dict(vocab)
    if fields.get("general.architecture", {}).get("value") != "llama":
        raise ValueError("the vocabulary must come from a llama-architecture GGUF")
    for key, value in overrides.items():
        fields[f"llama.{key}"] = {"types": [int(GGUFValueType.UINT32)], "value": value}
    embedding, layers = _hyper(fields, "embedding_length"), _hyper(fields, "block_count")
    heads = _hyper(fields, "attention.head_count")
    kv_heads = _hyper(fields, "attention.head_count_kv")
    ffn = _hyper(fields, "feed_forward_length")
    head_size = embedding // heads
    fields["llama.rope.dimension_count"] = {
        "types": [int(GGUFValueType.UINT32)],
        "value": head_size,
    }
    fields["general.name"] = {"types": [int(GGUFValueType.STRING)], "value": name}
    fields["general.file_type"] = {
        "types": [int(GGUFValueType.UINT32)],
        "value": FILE_TYPES[weights],
    }
    tokens = fields["tokenizer.ggml.tokens"]["value"]
    token_types = fields.get("tokenizer.ggml.token_type", {}).get("value") or []

    writer = GGUFWriter(target, "llama")
    for key, field in fields.items():
        if key == "general.architecture":
            continue  # GGUFWriter writes it
        types = [GGUFValueType(kind) for kind in field["types"]]
        sub_type = types[1] if types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field["value"], types[0], sub_type)

    rng = np.random.default_rng(seed)
    kind = WEIGHT_TYPES[weights]
    embed = random_blocks(len(tokens), embedding, GGMLQuantizationType.Q8_0, rng)
    for token, token_type in enumerate(token_types):
        if token_type == CONTROL_TOKEN:
            embed[token] = 0  # scale 0: the row is zero, its logit 0, never the argmax
    writer.add_tensor("token_embd.weight", embed, raw_dtype=GGMLQuantizationType.Q8_0)
    ones = np.ones(embedding, dtype=np.float32)
    kv_size = kv_heads * head_size
    for layer in range(layers):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", ones)
        writer.add_tensor(f"{prefix}.ffn_norm.weight", ones)
        # (output rows, input columns): ggml's ne0 is the input width.
        matrices = {
            "attn_q": (embedding, embedding),
            "attn_k": (kv_size, embedding),
            "attn_v": (kv_size, embedding),
            "attn_output": (embedding, embedding),
            "ffn_gate": (ffn, embedding),
            "ffn_up": (ffn, embedding),
            "ffn_down": (embedding, ffn),
        }
        for tensor, (rows, columns) in matrices.items():
            matrix_kind = kind
            if columns % 256 and kind == GGMLQuantizationType.Q4_K:
                matrix_kind = GGMLQuantizationType.Q8_0  # as llama-quantize falls back
            writer.add_tensor(
                f"{prefix}.{tensor}.weight",
                random_blocks(rows, columns, matrix_kind, rng),
                raw_dtype=matrix_kind,
            )
    writer.add_tensor("output_norm.weight", ones)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def parameter_count(path: Path) -> int:
    return sum(int(np.prod(tensor.shape)) for tensor in GGUFReader(path).tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    vocab = commands.add_parser("vocab", help="keep a GGUF's metadata, drop its weights")
    vocab.add_argument("source", type=Path)
    vocab.add_argument("target", type=Path)
    write = commands.add_parser("write", help="a random-weight GGUF from kept metadata")
    write.add_argument("vocab", type=Path)
    write.add_argument("target", type=Path)
    write.add_argument("--weights", choices=sorted(WEIGHT_TYPES), default="q4_1")
    write.add_argument("--name", default="random")
    for option, key in [
        ("--embedding", "embedding_length"),
        ("--layers", "block_count"),
        ("--heads", "attention.head_count"),
        ("--kv-heads", "attention.head_count_kv"),
        ("--ffn", "feed_forward_length"),
        ("--context", "context_length"),
    ]:
        write.add_argument(option, type=int, dest=key.replace(".", "_"), metavar="N")
    args = parser.parse_args()
    if args.command == "vocab":
        args.target.write_text(json.dumps(read_vocab(args.source)))
        print(f"{args.target}: {args.target.stat().st_size} bytes")
        return
    keys = ["embedding_length", "block_count", "attention.head_count"]
    keys += ["attention.head_count_kv", "feed_forward_length", "context_length"]
    overrides = {
        key: getattr(args, key.replace(".", "_"))
        for key in keys
        if getattr(args, key.replace(".", "_")) is not None
    }
    written = write_model(
        json.loads(args.vocab.read_text()),
        args.target,
        weights=args.weights,
        overrides=overrides,
        name=args.name,
    )
    print(
        f"{written}: {parameter_count(written) / 1e9:.2f}B parameters, "
        f"{written.stat().st_size / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
