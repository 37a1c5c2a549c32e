"""glibc functions that the os module has no binding for (Linux only)."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from functools import cache

__all__ = ["function"]


@cache
def function(name: str, *argtypes: type[ctypes._SimpleCData[int]]) -> Callable[..., int] | None:
    """glibc's `name`, taking `argtypes` and returning an int that is 0 on success
    (`ctypes.get_errno()` says why not); None off Linux or where glibc lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    call.argtypes = list(argtypes)
    call.restype = ctypes.c_int
    return call  # type: ignore[no-any-return]
