"""The import graph of gemma4vl/, read from the source with ``ast`` (every ``import`` statement, function-level
ones included, since a lazy import inside a function still ties two modules together): no cycle, and the library
never imports ``gemma4vl.testing`` or ``recipes``."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module name -> the modules of ``package`` (and top-level ``recipes``) it imports, anywhere in its source.

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``; relative imports are
    resolved against the importing module's package. Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and
    ``a.b``: edges to those packages too, except the importer's own (already being imported when it runs).
    """
    modules: dict[str, tuple[Path, bool]] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)

    def known(name: str) -> str | None:
        if name.split(".")[0] == "recipes":
            return "recipes"
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        base = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(t for t in (known(alias.name) for alias in node.names) if t)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    source = anchor + ("." + node.module if node.module else "")
                else:
                    source = node.module or ""
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    target = submodule if submodule in modules else known(source)
                    if target:
                        targets.add(target)
        own = _packages_of(name)
        targets |= {package for target in targets for package in _packages_of(target) if package not in own}
        targets.discard(name)
        graph[name] = targets
    return graph


def _packages_of(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walker_sees_imports_and_cycles(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")  # lazy and relative: still an edge
    (package / "c.py").write_text("import pkg.a\nimport recipes.finetune\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.a", "recipes"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_gemma4vl_has_no_import_cycle():
    graph = import_graph(REPO, "gemma4vl")
    # The graph is the real one: the CPU backend imports its tables and the patching module, not the reverse.
    assert {"gemma4vl.runtime.patching", "gemma4vl.runtime.patches_core", "gemma4vl.runtime.patches_bridge"} <= graph[
        "gemma4vl.runtime.cpu_backend"
    ]
    assert "gemma4vl.runtime.cpu_standins" in graph["gemma4vl.runtime.patches_core"]
    assert "gemma4vl.config.parallel" in graph["gemma4vl.runtime.distributed"]
    assert len(graph) > 60
    assert cycles(graph) == []


def test_the_library_never_imports_testing_or_recipes():
    graph = import_graph(REPO, "gemma4vl")
    library = {name: targets for name, targets in graph.items() if not name.startswith("gemma4vl.testing")}
    wrong = {
        name: sorted(t for t in targets if t == "recipes" or t.startswith("gemma4vl.testing"))
        for name, targets in library.items()
    }
    assert {name: targets for name, targets in wrong.items() if targets} == {}
    # The fixtures do import the library (so the check above looks at edges that exist).
    assert any(t.startswith("gemma4vl.") and not t.startswith("gemma4vl.testing")
               for name, targets in graph.items() if name.startswith("gemma4vl.testing") for t in targets)
