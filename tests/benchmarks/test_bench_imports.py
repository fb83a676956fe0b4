"""Benchmarks and examples run the libraries, never a CLI module: a CLI parses flags and
prints, and a benchmark that imports one measures (and breaks with) its argument handling."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("secagg", "wire", "fl_core", "clients", "server", "proofs")


def cli_imports(source: str, name: str) -> list[str]:
    """The fedsec CLI modules (``*_cli`` and ``fl_core.cli``) that ``source`` imports."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names = [node.module]
        else:
            continue
        for module in names:
            parts = module.split(".")
            if parts[0] in PACKAGES and (parts[-1].endswith("_cli") or parts == ["fl_core", "cli"]):
                found.append(f"{name}:{node.lineno} imports {module}")
    return found


def test_a_cli_import_is_found_in_every_form() -> None:
    source = (
        "from clients.simulate_cli import prepare\n"
        "import server.keygen_cli as keygen\n"
        "from fl_core.cli import main\n"
        "from fl_core.federation import Federation\n"
        "import argparse_cli\n"
    )
    assert cli_imports(source, "probe.py") == [
        "probe.py:1 imports clients.simulate_cli",
        "probe.py:2 imports server.keygen_cli",
        "probe.py:3 imports fl_core.cli",
    ]


def test_benchmarks_and_examples_import_no_cli() -> None:
    """They may start the ``fedsec`` command as a process, as a user does."""
    files = sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "examples").rglob("*.py"))
    assert len(files) > 10
    offenders = [
        f for path in files for f in cli_imports(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert offenders == []
