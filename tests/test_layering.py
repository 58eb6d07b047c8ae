"""Imports flow one way: serving → engine → structured → adapters → runtime → punica; the registry imports nothing of kvrun."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["kvrun.serving", "kvrun.engine", "kvrun.structured", "kvrun.adapters", "kvrun.runtime", "kvrun.punica"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def layer_of(module: str) -> int | None:
    for index, prefix in enumerate(ORDER):
        if module == prefix or module.startswith(prefix + "."):
            return index
    return None


@pytest.mark.parametrize("layer", ORDER)
def test_no_upward_imports(layer):
    own = ORDER.index(layer)
    folder = ROOT / layer.replace(".", "/")
    offenders = []
    for path in folder.rglob("*.py"):
        for module in imported_modules(path):
            target = layer_of(module)
            if target is not None and target < own:
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
            if layer == "kvrun.punica" and module.startswith("kvrun.") and target != own:
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_registry_imports_nothing_of_kvrun_or_torch():
    offenders = []
    for path in (ROOT / "adapters_registry").rglob("*.py"):
        for module in imported_modules(path):
            if module.split(".")[0] in ("kvrun", "torch", "numpy"):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, "\n".join(offenders)
