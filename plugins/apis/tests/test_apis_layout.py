"""`dmr_apis` is housed by dialect (docs/architecture.md, "Inside `dmr_apis`"): each
dialect's sub-package imports only itself and `common`, `common` imports no dialect, and
no function grows past 80 lines (a stream's state goes in a class, not a closure)."""

from __future__ import annotations

import ast
from pathlib import Path

import dmr_apis
import pytest

PACKAGE = Path(dmr_apis.__file__).parent
DIALECTS = ("openai", "ollama", "anthropic", "responses", "batch")
LONGEST_FUNCTION = 80


def _modules() -> dict[str, ast.Module]:
    return {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts): ast.parse(path.read_text())
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _dmr_apis_imports(tree: ast.Module) -> set[str]:
    """The `dmr_apis` sub-packages a module imports from, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(tree):
        names = (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "dmr_apis" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_the_package_holds_one_sub_package_per_dialect_and_common() -> None:
    top = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert top == {*DIALECTS, "common"}
    assert [path.name for path in PACKAGE.glob("*.py")] == ["__init__.py"]


@pytest.mark.parametrize("dialect", [*DIALECTS, "common"])
def test_a_dialect_imports_only_itself_and_common(dialect: str) -> None:
    allowed = {"common"} if dialect == "common" else {dialect, "common"}
    strays = {
        module: sorted(_dmr_apis_imports(tree) - allowed)
        for module, tree in _modules().items()
        if module.split(".")[0] == dialect and _dmr_apis_imports(tree) - allowed
    }
    assert strays == {}


def test_no_function_is_longer_than_80_lines() -> None:
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    ]
    assert long == []
