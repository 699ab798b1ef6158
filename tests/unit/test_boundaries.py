"""The import boundaries of the layout: the core (pdserve/) imports no role and no
deployment; the router imports no engine and never torch. Checked twice: every
import statement in the source (function-local ones too), and what importing every
module really loads (in a fresh interpreter)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLES_AND_DEPLOY = ("deploy", "router", "prefill_worker", "decode_worker")
ENGINE_AND_TORCH = ("pdserve.engine", "torch")


def _forbidden(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _imported_names(path: Path) -> list[str]:
    """Every module an import statement in ``path`` names, wherever the statement is."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def _modules(package: str) -> list[str]:
    """Every importable module of ``package`` (its __main__ would run the role)."""
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / package).rglob("*.py") if p.name != "__main__.py")


def _loaded_after_importing(modules: list[str]) -> list[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True)
    return list(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize(("package", "forbidden"),
                         [("pdserve", ROLES_AND_DEPLOY), ("router", ENGINE_AND_TORCH)])
def test_no_import_statement_crosses_the_boundary(package: str,
                                                  forbidden: tuple[str, ...]) -> None:
    crossings = [f"{p.relative_to(ROOT)}: {name}" for p in sorted((ROOT / package).rglob("*.py"))
                 for name in _imported_names(p) if _forbidden(name, forbidden)]
    assert crossings == []


@pytest.mark.parametrize(("package", "forbidden"),
                         [("pdserve", ROLES_AND_DEPLOY), ("router", ENGINE_AND_TORCH)])
def test_importing_every_module_loads_nothing_across(package: str,
                                                     forbidden: tuple[str, ...]) -> None:
    modules = _modules(package)
    assert f"{package}.cli" in modules or f"{package}.server" in modules  # the scan found them
    loaded = _loaded_after_importing(modules)
    assert [m for m in loaded if _forbidden(m, forbidden)] == []
