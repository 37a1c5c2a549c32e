"""The kit's modules re-export core names without importing them up front (PEP 562).

A kit module lists what it exports as imports under `if TYPE_CHECKING:` (so type
checkers and editors see every name and its type) and ends with

    if not TYPE_CHECKING:
        __getattr__, __dir__ = lazy_exports(__name__, __file__)

which reads that block and imports a name's module when the name is first used.
So a runner that imports `dmr.sdk.runner` does not load the server, a CLI command
that imports `dmr.sdk.dialect` for `fail` does not load Quart, and `dmr serve` does
not import the packaging code until a request needs `package_gguf`.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["exported_names", "lazy_exports"]


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def exported_names(source: str) -> dict[str, tuple[str, str]]:
    """{exported name: (module, name there)} from the module-level `if TYPE_CHECKING:`
    blocks of `source`."""
    found: dict[str, tuple[str, str]] = {}
    for statement in ast.parse(source).body:
        if not (isinstance(statement, ast.If) and _is_type_checking(statement.test)):
            continue
        for node in statement.body:
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    found[alias.asname or alias.name] = (node.module, alias.name)
    return found


def lazy_exports(
    module_name: str, path: str
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of the kit module `module_name` (at `path`)."""
    sources = exported_names(Path(path).read_text(encoding="utf-8"))

    def __getattr__(name: str) -> Any:
        try:
            origin, original = sources[name]
        except KeyError:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(origin), original)
        setattr(sys.modules[module_name], name, value)  # the next use is a plain lookup
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[module_name])) | set(sources))

    return __getattr__, __dir__
