"""The layers stay apart: the ingress loads no model libraries, engines load no Ray, no import cycles.

Each import check runs in a fresh interpreter, so what this test process imported earlier cannot hide a
violation.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "deployments")
HEAVY = ("torch", "transformers", "av", "tokenizers")  # numpy is fine: Ray itself loads it


def imported_after(statement: str) -> set[str]:
    """Top-level module names present in ``sys.modules`` after running ``statement`` in a new interpreter."""
    code = f"import sys, json; {statement}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", ["app.ingress", "app.builder", "app.local"])
def test_the_http_side_imports_no_model_libraries(module):
    loaded = imported_after(f"import {module}")
    assert not loaded & set(HEAVY), f"{module} pulls in {sorted(loaded & set(HEAVY))}"


def test_records_the_ingress_unpickles_import_only_the_standard_library():
    loaded = imported_after("import deployments.engines.records")
    assert not loaded & {*HEAVY, "ray", "pydantic"}


@pytest.mark.parametrize("module", ["deployments.engines.generation", "deployments.engines.whisper",
                                    "deployments.engines.chat_params", "deployments.models.loader"])
def test_engines_and_loaders_import_without_ray(module):
    assert "ray" not in imported_after(f"import {module}")


def _internal_imports(path: Path) -> set[str]:
    """Project modules that ``path`` imports, at module level or lazily inside functions (a lazy import
    hides a cycle from the interpreter, not from the design)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found


def test_no_import_cycles():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {name: {m for m in _internal_imports(path) if m in modules} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_ingress_module_does_not_import_the_model_side():
    """app/ imports deployments only in the builder (which binds the deployment classes)."""
    for path in (ROOT / "app").rglob("*.py"):
        if path.name == "builder.py":
            continue
        deps = {m for m in _internal_imports(path) if m.startswith("deployments")}
        assert not deps, f"{path.relative_to(ROOT)} imports {sorted(deps)}"
