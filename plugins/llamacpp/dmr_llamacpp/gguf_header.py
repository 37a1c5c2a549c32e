"""A small reader for the metadata at the head of a GGUF file.

The engine estimates memory in the server process, which must not import
llama_cpp, so it reads the few numbers it needs (layers, heads, context length)
straight from the file's key/value header.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["GgufHeaderError", "read_gguf_metadata"]

GGUF_MAGIC = b"GGUF"

# GGUF value types (gguf spec): scalars by struct format, 8 = string, 9 = array.
_SCALAR_FORMATS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING = 8
_ARRAY = 9


class GgufHeaderError(ValueError):
    """The file is not a GGUF file dmr can read."""


# Reads up to this size need no check: a short read says the file ended.
_SMALL_READ = 1 << 16


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    if size > _SMALL_READ:
        # A length field that lies (2^60) would make `read` allocate that much
        # before finding the file shorter: check what is left first.
        left = os.fstat(stream.fileno()).st_size - stream.tell()
        if size > left:
            raise GgufHeaderError(
                f"truncated or corrupt GGUF header: a field claims {size} bytes, {left} are left"
            )
    data = stream.read(size)
    if len(data) != size:
        raise GgufHeaderError("truncated GGUF header")
    return data


def _read_scalar(stream: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, _read_exact(stream, struct.calcsize(fmt)))[0]


def _read_string(stream: BinaryIO) -> str:
    length = _read_scalar(stream, "<Q")
    return _read_exact(stream, length).decode("utf-8", errors="replace")


def _read_value(stream: BinaryIO, value_type: int, *, keep_arrays: bool) -> Any:
    if value_type in _SCALAR_FORMATS:
        return _read_scalar(stream, _SCALAR_FORMATS[value_type])
    if value_type == _STRING:
        return _read_string(stream)
    if value_type == _ARRAY:
        item_type = _read_scalar(stream, "<I")
        count = _read_scalar(stream, "<Q")
        if not keep_arrays and item_type in _SCALAR_FORMATS:
            # Token tables are large; skip them without decoding.
            stream.seek(count * struct.calcsize(_SCALAR_FORMATS[item_type]), 1)
            return count
        if not keep_arrays and item_type == _STRING:
            for _ in range(count):
                stream.seek(_read_scalar(stream, "<Q"), 1)
            return count
        items = [_read_value(stream, item_type, keep_arrays=keep_arrays) for _ in range(count)]
        return items if keep_arrays else count
    raise GgufHeaderError(f"unknown GGUF value type {value_type}")


def read_gguf_metadata(path: Path, *, keep_arrays: bool = False) -> dict[str, Any]:
    """The header's key/value pairs. Arrays become their length unless `keep_arrays`."""
    with path.open("rb") as stream:
        if _read_exact(stream, 4) != GGUF_MAGIC:
            raise GgufHeaderError(f"{path} is not a GGUF file")
        version = _read_scalar(stream, "<I")
        if version < 2:
            raise GgufHeaderError(f"GGUF version {version} is too old")
        _tensor_count = _read_scalar(stream, "<Q")
        kv_count = _read_scalar(stream, "<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = _read_string(stream)
            value_type = _read_scalar(stream, "<I")
            metadata[key] = _read_value(stream, value_type, keep_arrays=keep_arrays)
        return metadata
