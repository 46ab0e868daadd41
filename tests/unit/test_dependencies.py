"""pyproject.toml declares what the package (pipeline/, stages/) imports, and nothing else; the
package's own modules import one another one way (no cycle)."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # the standard library's from Python 3.11

REPO = Path(__file__).resolve().parents[2]
# Declared, needed, and never imported by name.
UNIMPORTED = {
    "gguf": "transformers' GGUF loader reads the packaged model's .gguf file with it",
    "tensorboard": "torch.utils.tensorboard writes the event files with it",
}
# Imported, and rightly not declared.
UNDECLARED = {
    "deepspeed": "imported only under a DeepSpeed launch, whose environment brings it",
    "sklearn": "alt-profanity-check's own dependency; only its warning class, guarded",
}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _modules() -> dict[str, set[str]]:
    """``{module: every module it imports}``, imports inside functions included."""
    found: dict[str, set[str]] = {}
    for folder in ("pipeline", "stages"):
        for path in sorted((REPO / folder).glob("*.py")):
            name = folder if path.stem == "__init__" else f"{folder}.{path.stem}"
            names = found.setdefault(name, set())
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    # `from pipeline import hub` names a module, `from pipeline.x import y` not.
                    names |= ({f"{node.module}.{a.name}" for a in node.names}
                              if node.module in ("pipeline", "stages") else {node.module})
    return found


def _imported() -> set[str]:
    """The top-level modules the package imports, the standard library and itself left out."""
    names = {n.split(".")[0] for imports in _modules().values() for n in imports}
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("pipeline", "stages")}


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {_normal(re.split(r"[\s<>=!~\[;]", spec, maxsplit=1)[0])
            for spec in project["dependencies"]}


def test_every_dependency_is_imported_and_every_import_is_a_dependency():
    imported, declared = _imported(), _declared()
    assert set(UNDECLARED) <= imported and {_normal(n) for n in UNIMPORTED} <= declared
    dists = packages_distributions()
    needed = sorted(imported - set(UNDECLARED))
    assert [n for n in needed if n not in dists] == [], "imported, and not installed"
    provider = {n: {_normal(d) for d in dists[n]} for n in needed}
    assert [n for n in needed if not provider[n] & declared] == [], "imported, not declared"
    used = set().union(*provider.values()) | {_normal(n) for n in UNIMPORTED}
    assert sorted(declared - used) == [], "declared, never imported"


def test_the_package_modules_import_one_another_without_a_cycle():
    modules = _modules()
    graph = {m: {d for d in deps if d in modules} for m, deps in modules.items()}
    cycles, state, path = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert len(graph) > 20 and graph["pipeline.hub"]
    assert cycles == []
