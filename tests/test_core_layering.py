"""Core's modules import downwards only: no import circle, and the server never imports
the CLI (docs/architecture.md, "Layers").

The graph is read from the source with `ast`, not by importing it: an edge is an import
run when its module is imported (at module level, outside `if TYPE_CHECKING:`), since only
those make one module's import wait on another's. Imports inside functions run later,
when both modules are loaded, so they make no circle; but one from `dmr.server` into
`dmr.cli` still points up the floors, so that rule looks at every import.
"""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "core"


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    module_level: bool  # run on import, outside TYPE_CHECKING


def module_name(path: Path) -> str:
    parts = list(path.relative_to(CORE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def core_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((CORE / "dmr").rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_modules(
    node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]
) -> set[str]:
    """The core modules `node` imports: `from pkg import name` is `pkg.name` where that is
    a module, else `pkg`."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & modules
    base = node.module or ""
    if node.level:  # relative: from the importer's package, up level - 1 packages
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    submodules = {f"{base}.{alias.name}" for alias in node.names} & modules
    everything_a_module = len(submodules) == len(node.names)
    return submodules if everything_a_module else submodules | ({base} & modules)


def _walk(node: ast.AST, module_level: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import under `node`, and whether it runs when the module is imported."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, module_level
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.body:
                yield from _walk_statement(statement, False)
            for statement in child.orelse:
                yield from _walk_statement(statement, module_level)
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk(child, False)  # runs when called, not on import
        else:
            yield from _walk(child, module_level)  # class bodies, try, with: run on import


def _walk_statement(
    statement: ast.stmt, module_level: bool
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    holder = ast.Module(body=[statement], type_ignores=[])
    yield from _walk(holder, module_level)


def core_imports() -> list[Import]:
    modules = core_modules()
    found: list[Import] = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, module_level in _walk(tree, True):
            for name in sorted(_imported_modules(node, importer, is_package, set(modules))):
                if name != importer:
                    found.append(Import(importer, name, node.lineno, module_level))
    return found


def test_the_walker_sees_core_imports() -> None:
    """The graph is not empty by mistake: known module-level and lazy imports are in it."""
    imports = core_imports()
    module_level = {(i.importer, i.imported) for i in imports if i.module_level}
    assert ("dmr.plugins", "dmr.hookspecs") in module_level
    # The plugin kit names its exports under TYPE_CHECKING and imports them on first use.
    assert ("dmr.sdk", "dmr.hookspecs") not in module_level
    assert any(i.importer == "dmr.sdk" and i.imported == "dmr.hookspecs" for i in imports)
    # records names Store for typing only: no edge that could close a circle.
    assert ("dmr.records", "dmr.store") not in module_level
    assert any(i.importer == "dmr.records" and i.imported == "dmr.store" for i in imports)


def test_core_has_no_import_circle() -> None:
    graph: dict[str, set[str]] = {name: set() for name in core_modules()}
    for found in core_imports():
        if found.module_level:
            graph[found.importer].add(found.imported)
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as circle:
        pytest.fail(f"import circle in core: {' -> '.join(reversed(circle.args[1]))}")


def test_the_server_never_imports_the_cli() -> None:
    upward = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in core_imports()
        if i.importer.startswith("dmr.server") and i.imported.startswith("dmr.cli")
    ]
    assert upward == []


@pytest.mark.parametrize("bottom", ["dmr.media_types", "dmr.server_process"])
def test_the_shared_bottom_modules_import_no_core_module(bottom: str) -> None:
    """The store and the CLI and server import these; they must not import back up."""
    assert [i.imported for i in core_imports() if i.importer == bottom and i.module_level] == []


def test_the_scheduler_imports_no_plugins() -> None:
    """The scheduler is given the engines and formats (docs/architecture.md, "Scheduler"):
    no module of it asks the plugin manager, not even lazily."""
    asking = [
        f"{i.importer}:{i.line}"
        for i in core_imports()
        if i.importer.startswith("dmr.scheduler") and i.imported == "dmr.plugins"
    ]
    assert asking == []
