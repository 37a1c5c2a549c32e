"""Bench models with random weights, written with llama.cpp's `gguf` writer.

    python bench/random_gguf.py vocab SOURCE.gguf VOCAB.json
    python bench/random_gguf.py write VOCAB.json OUT.gguf [--embedding 2048 --layers 16
           --heads 32 --kv-heads 8 --ffn 8192 --context 4096 --weights q4_k]
           [--arch gemma3 --head-size 256 --sliding-window 512]

`vocab` keeps a real GGUF's metadata (tokenizer, chat template, hyperparameters:
about 2 MB for SmolLM2) and none of its weights. `write` makes a GGUF with that
metadata and random quantized weights, the hyperparameters taken from the source
unless given: a llama, or with `--arch gemma3` Gemma 3's graph (query and key norms,
norms after attention and after the FFN, sliding-window attention in five layers of
six). Speed depends on the shapes and the quantization, not on the weights' values,
so a machine that cannot fetch a model (the offline GPU machine `scripts/gpu-check`
runs on) benchmarks one of any size from a small file.

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


ARCHITECTURES = ("llama", "gemma3")  # write_model's; write_mamba writes "mamba"


def _hyper(fields: dict[str, Any], arch: str, key: str) -> int:
    return int(fields[f"{arch}.{key}"]["value"])


def _uint(value: int) -> dict[str, Any]:
    return {"types": [int(GGUFValueType.UINT32)], "value": value}


def write_model(
    vocab: dict[str, Any],
    target: Path,
    *,
    weights: str,
    overrides: dict[str, int],
    name: str,
    seed: int = 0,
    arch: str = "llama",
    head_size: int | None = None,
    sliding_window: int = 512,
) -> Path:
    """Write a GGUF of architecture `arch` (llama, gemma3) with `vocab`'s metadata,
    `overrides` applied to the hyperparameters, and random weights of type `weights`
    (q4_1, q4_k, q8_0); gemma3 attends over `sliding_window` tokens in its local layers."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: {', '.join(ARCHITECTURES)}")
    if vocab.get("general.architecture", {}).get("value") != "llama":
        raise ValueError("the vocabulary must come from a llama-architecture GGUF")
    # The source's hyperparameters, under the written architecture's prefix.
    fields = {
        (f"{arch}.{key[len('llama.') :]}" if key.startswith("llama.") else key): field
        for key, field in vocab.items()
    }
    for key, value in overrides.items():
        fields[f"{arch}.{key}"] = _uint(value)
    embedding = _hyper(fields, arch, "embedding_length")
    layers = _hyper(fields, arch, "block_count")
    heads = _hyper(fields, arch, "attention.head_count")
    kv_heads = _hyper(fields, arch, "attention.head_count_kv")
    ffn = _hyper(fields, arch, "feed_forward_length")
    head_size = head_size or embedding // heads
    fields[f"{arch}.rope.dimension_count"] = _uint(head_size)
    if arch == "gemma3":
        fields[f"{arch}.attention.key_length"] = _uint(head_size)
        fields[f"{arch}.attention.value_length"] = _uint(head_size)
        fields[f"{arch}.attention.sliding_window"] = _uint(sliding_window)
    fields["general.name"] = {"types": [int(GGUFValueType.STRING)], "value": name}
    fields["general.file_type"] = {
        "types": [int(GGUFValueType.UINT32)],
        "value": FILE_TYPES[weights],
    }
    tokens = fields["tokenizer.ggml.tokens"]["value"]
    token_types = fields.get("tokenizer.ggml.token_type", {}).get("value") or []

    writer = GGUFWriter(target, arch)
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
    norms = ["attn_norm", "ffn_norm"]
    if arch == "gemma3":
        norms += ["post_attention_norm", "post_ffw_norm"]
    q_size, kv_size = heads * head_size, kv_heads * head_size
    for layer in range(layers):
        prefix = f"blk.{layer}"
        for norm in norms:
            writer.add_tensor(f"{prefix}.{norm}.weight", ones)
        if arch == "gemma3":
            for norm in ("attn_q_norm", "attn_k_norm"):
                writer.add_tensor(f"{prefix}.{norm}.weight", np.ones(head_size, np.float32))
        # (output rows, input columns): ggml's ne0 is the input width.
        matrices = {
            "attn_q": (q_size, embedding),
            "attn_k": (kv_size, embedding),
            "attn_v": (kv_size, embedding),
            "attn_output": (embedding, q_size),
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


def write_mamba(
    vocab: dict[str, Any], target: Path, *, embedding: int, layers: int, name: str, seed: int = 0
) -> Path:
    """Write a Mamba (recurrent) GGUF with `vocab`'s tokenizer and random weights: one
    state per sequence instead of a KV cell per token, which a cache can drop whole but
    not cut back to a prefix. Inner width twice `embedding`, state 16, convolution 4."""
    if vocab.get("general.architecture", {}).get("value") != "llama":
        raise ValueError("the vocabulary must come from a llama-architecture GGUF")
    inner, state, rank, kernel = 2 * embedding, 16, max(1, embedding // 16), 4
    writer = GGUFWriter(target, "mamba")
    for key, field in vocab.items():
        if key in ("general.architecture", "general.name") or key.startswith("llama."):
            continue  # written below, or llama hyperparameters that mean nothing here
        types = [GGUFValueType(kind) for kind in field["types"]]
        sub_type = types[1] if types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field["value"], types[0], sub_type)
    writer.add_key_value("general.name", name, GGUFValueType.STRING)
    hyper = {
        "context_length": 4096,  # a recurrent model has no window; this is nominal
        "embedding_length": embedding,
        "block_count": layers,
        "feed_forward_length": 0,
        "attention.head_count": 0,
        "ssm.conv_kernel": kernel,
        "ssm.inner_size": inner,
        "ssm.state_size": state,
        "ssm.time_step_rank": rank,
    }
    for key, value in hyper.items():
        writer.add_key_value(f"mamba.{key}", value, GGUFValueType.UINT32)
    writer.add_key_value("mamba.attention.layer_norm_rms_epsilon", 1e-5, GGUFValueType.FLOAT32)

    rng = np.random.default_rng(seed)

    def small(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    tokens = vocab["tokenizer.ggml.tokens"]["value"]
    embed = random_blocks(len(tokens), embedding, GGMLQuantizationType.Q8_0, rng)
    token_types = vocab.get("tokenizer.ggml.token_type", {}).get("value") or []
    for token, token_type in enumerate(token_types):
        if token_type == CONTROL_TOKEN:
            embed[token] = 0  # as in write_model: never the argmax
    writer.add_tensor("token_embd.weight", embed, raw_dtype=GGMLQuantizationType.Q8_0)
    for layer in range(layers):
        prefix = f"blk.{layer}"
        # numpy shapes are ggml's reversed: (rows, input width).
        tensors = {
            "attn_norm.weight": np.ones(embedding, np.float32),
            "ssm_in.weight": small(2 * inner, embedding),
            "ssm_conv1d.weight": small(inner, kernel),
            "ssm_conv1d.bias": small(inner),
            "ssm_x.weight": small(rank + 2 * state, inner),
            "ssm_dt.weight": small(inner, rank),
            "ssm_dt.bias": small(inner),
            "ssm_a": -np.exp(small(inner, state)),  # negative: the state decays
            "ssm_d": np.ones(inner, np.float32),
            "ssm_out.weight": small(embedding, inner),
        }
        for tensor, values in tensors.items():
            writer.add_tensor(f"{prefix}.{tensor}", values)
    writer.add_tensor("output_norm.weight", np.ones(embedding, np.float32))
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
    write.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    write.add_argument("--head-size", type=int, metavar="N", help="default: embedding / heads")
    write.add_argument("--sliding-window", type=int, default=512, metavar="N", help="gemma3")
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
        arch=args.arch,
        head_size=args.head_size,
        sliding_window=args.sliding_window,
    )
    print(
        f"{written}: {parameter_count(written) / 1e9:.2f}B parameters, "
        f"{written.stat().st_size / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
