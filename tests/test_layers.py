"""The core never reaches an edge: it imports only the standard library, its own core modules
and a few pure third-party helpers. Parsed from the source, not imported."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "forewarn"
CORE = {
    "model",
    "records",
    "expr",
    "playbook",
    "signals",
    "adaptive",
    "detect",
    "engine",
    "runner",
    "decide",
    "outcomes",
    "policy",
    "describe",
    "errors",
    "ingest",
    "webhooks",
    "stats",
}
PURE_THIRD_PARTY = {"msgspec", "yaml"}
# Modules of the standard library that reach the outside world (clock, disk, network, processes).
WORLD = {
    "os",
    "sys",
    "io",
    "time",
    "socket",
    "subprocess",
    "pathlib",
    "shutil",
    "gzip",
    "random",
    "secrets",
    "threading",
    "asyncio",
    "sqlite3",
    "urllib.request",
    "http",
    "tempfile",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "forewarn":
                names.update(f"forewarn.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
    return names


def test_every_core_module_exists():
    present = {p.stem for p in PACKAGE.glob("*.py")}
    assert present >= CORE, f"core modules missing: {sorted(CORE - present)}"


def test_core_imports_only_core_stdlib_and_pure_helpers():
    offences = []
    for name in sorted(CORE):
        for imported in _imports(PACKAGE / f"{name}.py"):
            top = imported.split(".")[0]
            if top == "forewarn":
                module = imported.split(".")[1] if "." in imported else ""
                if module and module not in CORE:
                    offences.append(f"{name} imports the edge module forewarn.{module}")
            elif top == "__future__" or top in PURE_THIRD_PARTY:
                continue
            elif top not in sys.stdlib_module_names:
                offences.append(f"{name} imports the third-party package {top}")
            elif imported in WORLD or top in WORLD:
                offences.append(f"{name} imports {imported}, which reaches the outside world")
    assert not offences, "\n".join(offences)


def test_the_checker_catches_an_edge_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom forewarn import cli\n")
    found = _imports(bad)
    assert "time" in found and "forewarn.cli" in found
