"""The shape of the package (docs/architecture.md): one-way imports, small modules and functions, a light import.

Measured with ``ast`` on the source files, so nothing here imports the modules it checks.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hybridq"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80

ALLOWED_MODULES: dict[str, str] = {
    # module (dotted) -> one line; docs/architecture.md says why, under "Size allow-list"
}
ALLOWED_FUNCTIONS: dict[str, str] = {
    # "module:qualified.name" -> one line; docs/architecture.md says why
}


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name ``from ... import`` refers to, inside ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any level (module, class or function body)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node)
                # `from . import _runtime` names a module; `from .x import name` names x
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import hybridq.analysis.engine` as written, else its nearest package
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it is acyclic (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_sees_function_level_and_relative_imports() -> None:
    graph = import_graph()
    assert "hybridq._runtime" in graph["hybridq.analysis.running"]  # `from .. import _runtime`
    assert "hybridq.analysis.results" in graph["hybridq.snapshot"]  # `from .analysis.results import ...`
    assert "hybridq.report" in graph["hybridq.api"]  # imported inside a function


def test_no_import_cycle_inside_hybridq() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _long_functions(tree: ast.AST, mod: str) -> dict[str, int]:
    """``module:qualified.name`` -> lines, for every function (nested ones too) over the limit."""
    out: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    lines = (child.end_lineno or child.lineno) - start + 1
                    if lines > MAX_FUNCTION_LINES:
                        out[f"{mod}:{name}"] = lines
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return out


def test_no_module_and_no_function_over_the_limit_except_the_allow_list() -> None:
    big_modules, long_functions = {}, {}
    for mod, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES:
            big_modules[mod] = n
        long_functions.update(_long_functions(ast.parse(text), mod))
    assert {m: n for m, n in big_modules.items() if m not in ALLOWED_MODULES} == {}, (
        f"modules over {MAX_MODULE_LINES} lines: split them, or add them to the allow-list with a reason in docs/architecture.md"
    )
    assert {f: n for f, n in long_functions.items() if f not in ALLOWED_FUNCTIONS} == {}, (
        f"functions over {MAX_FUNCTION_LINES} lines: split them, or add them to the allow-list with a reason in docs/architecture.md"
    )
    # the allow-list holds only what still needs it
    assert sorted(set(ALLOWED_MODULES) - set(big_modules)) == []
    assert sorted(set(ALLOWED_FUNCTIONS) - set(long_functions)) == []


def test_every_allow_list_entry_is_explained_in_the_architecture_page() -> None:
    doc = ARCHITECTURE.read_text(encoding="utf-8")
    section = doc.split("## Size allow-list", 1)[1] if "## Size allow-list" in doc else ""
    for entry in [*ALLOWED_MODULES, *ALLOWED_FUNCTIONS]:
        assert re.search(rf"`{re.escape(entry)}`[^\n]*\S", section), f"{entry} has no reason in docs/architecture.md"


HEAVY = ("onnxruntime", "matplotlib", "numba")


@pytest.mark.parametrize(
    "code",
    [
        "import hybridq",
        # `hybridq --help`: the CLI's app built and its help rendered, in this process
        "import sys; sys.argv = ['hybridq', '--help']\n"
        "from hybridq.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code",
    ],
    ids=["import", "help"],
)
def test_import_and_help_load_no_heavy_library(code: str) -> None:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_every_subpackage_ships_in_the_wheel() -> None:
    """pyproject lists packages explicitly: a new subpackage missing there works editable and breaks `pip install .`."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert sorted(found - listed) == []
