"""dmr: a Python implementation of Docker Model Runner."""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # Read from the installed metadata on first use only: importlib.metadata costs a
    # `dmr` command tens of milliseconds it mostly does not need.
    if name != "__version__":
        raise AttributeError(f"module 'dmr' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("dmr")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0.0.0"
    globals()["__version__"] = found
    return found
