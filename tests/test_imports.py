"""Every product module imports on its own, and the product's imports form no circle.

A circle (merge_adapter -> verify_merge -> merge_adapter, as there was) works only in the order
someone happened to import things, and makes neither module changeable alone. The graph is read
from the source (ast), lazy imports inside functions included: an import deferred to keep start-up
light is still a dependency, and the old circle ran through one. No product module needs a GPU to
be imported (vLLM is imported by the server process, not here), so none is skipped.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("client", "serve", "merge")
SCRIPTS = ("merge_adapter", "verify_merge")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the product (not tests, benchmarks or scripts)."""
    files = [path for package in PACKAGES for path in sorted((ROOT / package).glob("*.py"))]
    files += [ROOT / f"{script}.py" for script in SCRIPTS]
    return {_module_name(path): path for path in files}


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute names one import statement brings in (``from a import b`` gives a and a.b:
    which of them is a module is decided by the caller)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package, up level - 1 more
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the product modules it imports, anywhere in its file."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _imported(node, name, path.name == "__init__.py"):
                    if target in modules and target != name:
                        edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as [a, b, ..., a], or None (depth-first, three colours)."""
    state: dict[str, str] = {}  # absent: unseen; "open": on the current path; "done": no cycle below
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


@pytest.mark.parametrize("module", sorted(product_modules()))
def test_each_product_module_imports_in_a_fresh_interpreter(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    last = proc.stderr.strip().splitlines()[-1:] or [""]
    assert proc.returncode == 0, f"import {module} failed: {last[0]}"


def test_the_product_imports_form_no_cycle() -> None:
    graph = import_graph(product_modules())
    # The graph is read at all: the merge's modules and its two scripts are in it, and linked.
    assert {"merge_adapter", "verify_merge", "merge.verify", "client", "serve.launcher"} <= set(graph)
    assert "merge.verify" in graph["merge_adapter"] and "merge.verify" in graph["verify_merge"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_sees_a_circle_through_a_lazy_import() -> None:
    """The shape the merge had: a top-level import one way, a lazy one (in a function) back."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    source = "def f():\n    from verify_merge import verify\n"
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom))
    assert _imported(node, "merge_adapter", False) == ["verify_merge", "verify_merge.verify"]
