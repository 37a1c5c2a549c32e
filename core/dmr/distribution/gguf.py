"""A small, defensive GGUF header reader (metadata and tensor shapes only).

Every count and length in the header is checked against what the file can still
hold BEFORE anything is allocated or looped over, so a truncated download or a
hostile header gives a clear `GGUFError` instead of a memory blow-up.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "GGUFError",
    "GGUFFile",
    "format_metadata_value",
    "quantization_name",
    "read_gguf",
]

MAGIC = b"GGUF"
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_STRING = 64 * 1024 * 1024
MAX_DIMS = 8
MAX_ARRAY_DEPTH = 4

# GGUF value types: (struct format, size) for the fixed-size ones.
_FIXED: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9
_FLOAT_BITS = {6: 32, 12: 64}

# llama.cpp's `general.file_type` (llama_ftype) names.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}  # fmt: skip
# ggml tensor types, for files without `general.file_type`.
_TENSOR_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip

MetadataValue = int | float | bool | str | list["MetadataValue"] | None


DEFAULT_ALIGNMENT = 32  # GGUF spec, when general.alignment is absent


class GGUFError(ValueError):
    """The file is not a GGUF file dmr can read (truncated, hostile or corrupt)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    type: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFFile:
    path: Path
    version: int
    size: int
    # Arrays longer than `max_array` are skipped (tokenizer vocabularies).
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    metadata_types: dict[str, int] = field(default_factory=dict)
    tensors: list[Tensor] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else ""

    @property
    def parameters(self) -> int:
        return sum(tensor.elements for tensor in self.tensors)


class _Reader:
    def __init__(self, handle: BinaryIO, size: int, path: Path) -> None:
        self.handle = handle
        self.size = size
        self.position = 0
        self.path = path

    @property
    def remaining(self) -> int:
        return self.size - self.position

    def need(self, count: int, what: str) -> None:
        if count < 0 or count > self.remaining:
            raise GGUFError(
                f"{self.path.name}: truncated or corrupt GGUF: {what} needs {count} bytes "
                f"at offset {self.position}, the file has {self.remaining} left"
            )

    def read(self, count: int, what: str) -> bytes:
        self.need(count, what)
        data = self.handle.read(count)
        if len(data) != count:
            raise GGUFError(f"{self.path.name}: truncated GGUF while reading {what}")
        self.position += count
        return data

    def skip(self, count: int, what: str) -> None:
        self.need(count, what)
        self.handle.seek(count, 1)
        self.position += count

    def unpack(self, fmt: str, size: int, what: str) -> int | float | bool:
        value: int | float | bool = struct.unpack(fmt, self.read(size, what))[0]
        return value

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", 8, what))

    def string(self, what: str) -> str:
        length = self.u64(f"{what} length")
        if length > MAX_STRING:
            raise GGUFError(
                f"{self.path.name}: truncated or corrupt GGUF: {what} claims {length} bytes"
            )
        return self.read(length, what).decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        self.skip(self.u64(f"{what} length"), what)


def _check_count(reader: _Reader, count: int, limit: int, item_min: int, what: str) -> None:
    if count > limit or count * item_min > reader.remaining:
        raise GGUFError(
            f"{reader.path.name}: truncated or corrupt GGUF header: {count} {what} cannot "
            f"fit in the {reader.remaining} bytes left (limit {limit})"
        )


def _read_value(
    reader: _Reader, value_type: int, key: str, depth: int, keep: bool, max_array: int
) -> MetadataValue:
    if value_type in _FIXED:
        fmt, size = _FIXED[value_type]
        if not keep:
            reader.skip(size, key)
            return None
        return reader.unpack(fmt, size, key)
    if value_type == _STRING:
        if not keep:
            reader.skip_string(key)
            return None
        return reader.string(key)
    if value_type == _ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFError(f"{reader.path.name}: arrays nested too deep in {key!r}")
        item_type = reader.u32(f"{key} array type")
        count = reader.u64(f"{key} array length")
        item_min = (
            _FIXED[item_type][1]
            if item_type in _FIXED
            else 8
            if item_type in (_STRING, _ARRAY)
            else 0
        )
        if item_min == 0:
            raise GGUFError(f"{reader.path.name}: unknown array item type {item_type} in {key!r}")
        _check_count(reader, count, reader.size, item_min, f"array items in {key!r}")
        keep_items = keep and count <= max_array
        if item_type in _FIXED and not keep_items:
            reader.skip(count * item_min, key)
            return None
        items = [
            _read_value(reader, item_type, key, depth + 1, keep_items, max_array)
            for _ in range(count)
        ]
        return items if keep_items else None
    raise GGUFError(f"{reader.path.name}: unknown GGUF value type {value_type} for {key!r}")


def read_gguf(path: Path, *, max_array: int = 50) -> GGUFFile:
    """Read a GGUF file's header: metadata (arrays > `max_array` skipped) and tensors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        handle = path.open("rb")
    except OSError as error:
        raise GGUFError(f"cannot read {path}: {error.strerror or error}") from error
    with handle:
        reader = _Reader(handle, size, path)
        if size < 4 or reader.read(4, "magic") != MAGIC:
            raise GGUFError(f"{path.name}: not a GGUF file (bad magic)")
        version = reader.u32("version")
        if version not in (2, 3):
            raise GGUFError(f"{path.name}: unsupported GGUF version {version} (dmr reads 2 and 3)")
        tensor_count = reader.u64("tensor count")
        kv_count = reader.u64("metadata count")
        # The smallest key/value is 13 bytes and the smallest tensor info 24.
        _check_count(reader, kv_count, MAX_KV, 13, "metadata entries")
        _check_count(reader, tensor_count, MAX_TENSORS, 24, "tensors")
        gguf = GGUFFile(path=path, version=version, size=size)
        offsets: list[tuple[str, int]] = []
        for _ in range(kv_count):
            key = reader.string("metadata key")
            value_type = reader.u32(f"type of {key!r}")
            value = _read_value(reader, value_type, key, 0, True, max_array)
            if value is not None:
                gguf.metadata[key] = value
                gguf.metadata_types[key] = value_type
        for _ in range(tensor_count):
            name = reader.string("tensor name")
            n_dims = reader.u32(f"dimensions of {name!r}")
            if n_dims > MAX_DIMS:
                raise GGUFError(f"{path.name}: tensor {name!r} claims {n_dims} dimensions")
            shape = tuple(reader.u64(f"shape of {name!r}") for _ in range(n_dims))
            tensor_type = reader.u32(f"type of {name!r}")
            offsets.append((name, reader.u64(f"offset of {name!r}")))
            gguf.tensors.append(Tensor(name=name, shape=shape, type=tensor_type))
        # Tensor data starts at the next multiple of the alignment after the header.
        alignment = gguf.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
            raise GGUFError(f"{path.name}: invalid general.alignment {alignment!r}")
        data_start = -(-reader.position // alignment) * alignment
        for name, offset in offsets:
            if data_start + offset > size:
                raise GGUFError(
                    f"{path.name}: corrupt GGUF: tensor {name!r} starts at byte "
                    f"{data_start + offset}, past the end of the {size}-byte file"
                )
        return gguf


def quantization_name(gguf: GGUFFile) -> str:
    file_type = gguf.metadata.get("general.file_type")
    if isinstance(file_type, int) and not isinstance(file_type, bool) and file_type in _FILE_TYPES:
        return _FILE_TYPES[file_type]
    # Else the type holding most weights.
    totals: dict[int, int] = {}
    for tensor in gguf.tensors:
        totals[tensor.type] = totals.get(tensor.type, 0) + tensor.elements
    if not totals:
        return ""
    dominant = max(totals, key=lambda t: totals[t])
    return _TENSOR_TYPES.get(dominant, f"type {dominant}")


def _go_float(value: float, bits: int) -> str:
    """How Go's `%v` prints a float, which is what DMR writes into its config."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    # numpy (about 12 MB resident) prints the shortest float32 that reads back the same, as Go
    # does; imported here, as only packaging formats floats, not the idle server.
    import numpy as np

    number = np.float32(value) if bits == 32 else np.float64(value)
    scientific = np.format_float_scientific(number, unique=True, trim="-")
    mantissa, _, exponent_text = scientific.partition("e")
    exponent = int(exponent_text)
    if exponent < -4 or exponent >= 21:
        return f"{mantissa}e{'+' if exponent >= 0 else '-'}{abs(exponent):02d}"
    return np.format_float_positional(number, unique=True, trim="-")


def format_metadata_value(value: MetadataValue, value_type: int | None = None) -> str:
    """A metadata value as DMR's config map holds it (a string, Go formatting)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _go_float(value, _FLOAT_BITS.get(value_type or 12, 64))
    if isinstance(value, list):
        return "[" + " ".join(format_metadata_value(item) for item in value) + "]"
    if value is None:
        return ""
    return str(value)


def metadata_strings(gguf: GGUFFile) -> dict[str, str]:
    return {
        key: format_metadata_value(value, gguf.metadata_types.get(key))
        for key, value in sorted(gguf.metadata.items())
    }


def merge_shards(shards: Sequence[GGUFFile]) -> GGUFFile:
    """One view of a sharded model: the first shard's metadata, every shard's tensors."""
    first = shards[0]
    merged = GGUFFile(
        path=first.path,
        version=first.version,
        size=sum(shard.size for shard in shards),
        metadata=dict(first.metadata),
        metadata_types=dict(first.metadata_types),
    )
    for shard in shards:
        merged.tensors.extend(shard.tensors)
    return merged
