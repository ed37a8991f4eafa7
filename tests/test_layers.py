"""The layering README and docs/architecture.md state, checked on every import in the tree (function-local
imports included): deployments → flows → tasks → (awm_core, storage); storage → the parts of awm_core
that describe data (models, errors, settings, db); awm_core never reaches up."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from awm_core.interop.wheels import imported_module

REPO = Path(__file__).resolve().parents[1]

# package -> (top-level packages it must never import, the awm_core modules it may import; None = any)
RULES = {
    "awm_core": ({"prefect", "storage", "flows", "tasks"}, None),
    "storage": ({"prefect", "flows", "tasks"}, {"awm_core.models", "awm_core.errors", "awm_core.settings",
                                                "awm_core.db"}),
    "tasks": ({"flows"}, None),
}


def imports_of(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, relative imports resolved against its package."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            name = imported_module(node, package)
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{a.name}") for a in node.names if name == "awm_core"]
    return found


def violations(package: str, root: Path = REPO) -> list[str]:
    banned, allowed_core = RULES[package]
    out = []
    for path in sorted((root / package).rglob("*.py")):
        for line, module in imports_of(path, root):
            top = module.split(".")[0]
            where = f"{path.relative_to(root)}:{line} imports {module}"
            if top in banned:
                out.append(where)
            elif allowed_core is not None and top == "awm_core" and module != "awm_core" and not any(
                    module == m or module.startswith(m + ".") for m in allowed_core):
                out.append(where)
    return out


@pytest.mark.parametrize("package", sorted(RULES))
def test_no_layer_reaches_up(package):
    assert violations(package) == []


def test_the_check_sees_a_violation(tmp_path):
    """Planted upward imports are reported with their file and line (the check can fail)."""
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "probe.py").write_text(
        "from . import rows\nfrom awm_core.models import Task\n\ndef f():\n    from flows.cli import main\n"
        "    from awm_core.agent import run_episode\n")
    assert violations("storage", tmp_path) == ["storage/probe.py:5 imports flows.cli",
                                               "storage/probe.py:6 imports awm_core.agent"]
